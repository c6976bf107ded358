# Resumable state lives in results/<character>/.state, outside the declared outputs, because
# Snakemake deletes a job's outputs before it runs and after it fails. Each subject is given as
# --instance-dir D [--class-manifest M].
rule train:
    input:
        model=base_model,
        instance=instance_dirs,
        class_manifests=class_manifests,
    output:
        model=f"{R}/{{character}}/train/model.safetensors",
        loss=f"{R}/{{character}}/train/loss.png",
    params:
        settings=lambda wc: json.dumps(dpconfig.train_settings(char(wc)), sort_keys=True),
        tokenizer=tokenizer_arg,
        subjects=lambda wc, input: shlex.join(
            [a for i, d in enumerate(input.instance) for a in ["--instance-dir", d]
             + (["--class-manifest", input.class_manifests[i]] if input.class_manifests else [])]
        ),
        state=lambda wc: f"{R}/{wc.character}/.state",
        workdir=lambda wc: f"{R}/{wc.character}/train",
    log:
        f"{R}/{{character}}/logs/train.log",
    resources:
        gpu=1,
    shell:
        "dreampipe train --model {input.model:q} {params.tokenizer} {params.subjects}"
        " --settings {params.settings:q} --state {params.state:q}"
        " --workdir {params.workdir:q} --out {output.model:q} --log {log}"

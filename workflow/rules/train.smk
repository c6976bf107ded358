# Resumable state lives in results/<character>/.state, outside the declared outputs, because
# Snakemake deletes a job's outputs before it runs and after it fails. Each subject is given as
# --instance-dir D [--class-manifest M].
rule train:
    input:
        model=base_model_files,
        fallback=base_fallback,
        instance=instance_dirs,
        class_manifests=class_manifests,
    output:
        model=f"{R}/{{character}}/train/model.safetensors",
        loss=report(
            f"{R}/{{character}}/train/loss.png",
            caption="../report/loss.rst",
            category="{character}",
            subcategory="3 training",
            labels={"figure": "loss"},
        ),
        samples=report(
            f"{R}/{{character}}/train/samples.png",
            caption="../report/train_samples.rst",
            category="{character}",
            subcategory="2 training samples",
            labels={"figure": "samples over steps"},
        ),
    log:
        f"{R}/{{character}}/logs/train.log",
    benchmark:
        f"{R}/{{character}}/benchmarks/train.tsv"
    conda:
        "../../envs/dreampipe.yaml"
    resources:
        gpu=train_gpus,
    params:
        settings=lambda wc: json.dumps(
            dpconfig.split_train_settings(char(wc))[0], sort_keys=True
        ),
        # A function of the output is not a tracked param: changing how often training samples or
        # saves, or how it compiles, reruns nothing (the new values apply the next time it trains).
        untracked=lambda wc, output: json.dumps(
            dpconfig.split_train_settings(char(wc))[1], sort_keys=True
        ),
        model=base_model,
        tokenizer=tokenizer_arg,
        base_options=base_options,
        subjects=lambda wc, input: shlex.join(
            [
                arg
                for i, d in enumerate(input.instance)
                for arg in ["--instance-dir", d]
                + (
                    ["--class-manifest", input.class_manifests[i]]
                    if input.class_manifests
                    else []
                )
            ]
        ),
        state=lambda wc: f"{R}/{wc.character}/.state",
        workdir=lambda wc: f"{R}/{wc.character}/train",
    shell:
        "dreampipe train --model {params.model:q} {params.base_options} {params.tokenizer} {params.subjects}"
        " --settings {params.settings:q} --untracked-settings {params.untracked:q} --state {params.state:q}"
        " --workdir {params.workdir:q} --out {output.model:q} --log {log:q}"

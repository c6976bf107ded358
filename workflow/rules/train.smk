# Resumable state lives in results/<character>/.state, outside the declared outputs, because
# Snakemake deletes a job's outputs before it runs and after it fails.
rule train:
    input:
        model=base_model,
        instance=f"{R}/{{character}}/instance",
        class_manifest=class_manifest,
    output:
        model=f"{R}/{{character}}/train/model.safetensors",
        loss=report(
            f"{R}/{{character}}/train/loss.png",
            caption="../report/loss.rst",
            category="{character}",
            subcategory="3 training",
            labels={"figure": "loss"},
        ),
    log:
        f"{R}/{{character}}/logs/train.log",
    benchmark:
        f"{R}/{{character}}/benchmarks/train.tsv"
    conda:
        "../../envs/dreampipe.yaml"
    resources:
        gpu=1,
    params:
        settings=lambda wc: json.dumps(
            dpconfig.train_settings(char(wc)), sort_keys=True
        ),
        tokenizer=tokenizer_arg,
        class_arg=lambda wc, input: (
            f"--class-manifest {input.class_manifest}" if input.class_manifest else ""
        ),
        state=lambda wc: f"{R}/{wc.character}/.state",
        workdir=lambda wc: f"{R}/{wc.character}/train",
    shell:
        "dreampipe train --model {input.model:q} {params.tokenizer} --instance-dir {input.instance:q}"
        " {params.class_arg} --settings {params.settings:q} --state {params.state:q}"
        " --workdir {params.workdir:q} --out {output.model:q} --log {log}"

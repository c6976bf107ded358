rule export:
    input:
        f"{R}/{{character}}/train/model.safetensors",
    output:
        f"{R}/{{character}}/{{character}}.{{format}}",
    log:
        f"{R}/{{character}}/logs/export-{{format}}.log",
    benchmark:
        f"{R}/{{character}}/benchmarks/export-{{format}}.tsv"
    wildcard_constraints:
        format="safetensors|ckpt",  # the file's type is its suffix: a new format is a new file
    conda:
        "../../envs/dreampipe.yaml"
    params:
        dtype=lambda wc: char(wc)["export"]["dtype"],
        tokenizer=tokenizer_arg,
        settings=export_settings,
    shell:
        "dreampipe export {input:q} {output:q} --dtype {params.dtype:q} {params.tokenizer}"
        " --settings {params.settings:q} --log {log:q}"


rule export_diffusers:
    input:
        f"{R}/{{character}}/train/model.safetensors",
    output:
        directory(f"{R}/{{character}}/{{character}}-diffusers"),
    log:
        f"{R}/{{character}}/logs/export-diffusers.log",
    conda:
        "../../envs/dreampipe.yaml"
    params:
        dtype=lambda wc: char(wc)["export"]["dtype"],
        tokenizer=tokenizer_arg,
    shell:
        "dreampipe export {input:q} {output:q} --dtype {params.dtype:q} {params.tokenizer} --log {log:q}"


# The LoRA file: with train.method lora the layers training kept beside the merged weights, as
# trained; otherwise extracted from the finetune (export.lora_rank).
rule export_lora:
    input:
        trained=f"{R}/{{character}}/train/model.safetensors",
        base=base_model_files,
        fallback=base_fallback,
    output:
        f"{R}/{{character}}/{{character}}.lora.safetensors",
    log:
        f"{R}/{{character}}/logs/export-lora.log",
    benchmark:
        f"{R}/{{character}}/benchmarks/export-lora.tsv"
    conda:
        "../../envs/dreampipe.yaml"
    threads: 4  # the SVDs; capped at --cores by Snakemake
    params:
        base=base_model,
        ranks=lambda wc: shlex.join(
            []
            if char(wc)["train"]["method"] == "lora"
            else ["--rank", str(char(wc)["export"]["lora_rank"])]
            + (
                ["--conv-rank", str(char(wc)["export"]["lora_conv_rank"])]
                if char(wc)["export"]["lora_conv_rank"]
                else []
            )
        ),
        dtype=lambda wc: char(wc)["export"]["dtype"],
        base_options=base_options,
        settings=export_settings,
    shell:
        "dreampipe extract-lora {input.trained:q} {params.base:q} {output:q} {params.ranks}"
        " --dtype {params.dtype:q} {params.base_options} --settings {params.settings:q} --log {log:q}"

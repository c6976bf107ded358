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
        settings=lambda wc: json.dumps(
            {
                "subjects": [
                    {k: s[k] for k in ("token", "class_word", "instance_prompt")}
                    for s in char(wc)["subjects"]
                ],
                **dpconfig.split_train_settings(char(wc))[0],
            }
        ),
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


# method lora: the LoRA that training kept beside the merged model's weights, in kohya's layout.
rule export_lora:
    input:
        f"{R}/{{character}}/train/model.safetensors",
    output:
        f"{R}/{{character}}/{{character}}.lora.safetensors",
    log:
        f"{R}/{{character}}/logs/export-lora.log",
    benchmark:
        f"{R}/{{character}}/benchmarks/export-lora.tsv"
    conda:
        "../../envs/dreampipe.yaml"
    params:
        dtype=lambda wc: char(wc)["export"]["dtype"],
        settings=lambda wc: json.dumps(dpconfig.split_train_settings(char(wc))[0]),
    shell:
        "dreampipe export {input:q} {output:q} --dtype {params.dtype:q}"
        " --settings {params.settings:q} --log {log:q}"

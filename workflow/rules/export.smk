rule export:
    input:
        f"{R}/{{character}}/train/model.safetensors",
    output:
        f"{R}/{{character}}/{{character}}.safetensors",
    log:
        f"{R}/{{character}}/logs/export.log",
    conda:
        "../../envs/dreampipe.yaml"
    params:
        dtype=lambda wc: char(wc)["export"]["dtype"],
        tokenizer=tokenizer_arg,
        settings=lambda wc: json.dumps(
            {
                "token": char(wc)["token"],
                "class_word": char(wc)["class_word"],
                **dpconfig.train_settings(char(wc)),
            }
        ),
    shell:
        "dreampipe export {input:q} {output:q} --dtype {params.dtype} {params.tokenizer}"
        " --settings {params.settings:q} --log {log}"

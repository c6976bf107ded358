rule export:
    input:
        f"{R}/{{character}}/train/model.safetensors",
    output:
        f"{R}/{{character}}/{{character}}.safetensors",
    params:
        dtype=lambda wc: char(wc)["export"]["dtype"],
        tokenizer=tokenizer_arg,
        settings=lambda wc: json.dumps(
            {"token": char(wc)["token"], "class_word": char(wc)["class_word"], **dpconfig.train_settings(char(wc))}
        ),
    log:
        f"{R}/{{character}}/logs/export.log",
    shell:
        "dreampipe export {input:q} {output:q} --dtype {params.dtype} {params.tokenizer}"
        " --settings {params.settings:q} --log {log}"

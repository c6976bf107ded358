rule tiny_model:
    output:
        model=TINY_MODEL,
        tokenizer=directory(TINY_TOKENIZER),
    log:
        f"{R}/base/logs/tiny_model.log",
    conda:
        "../../envs/dreampipe.yaml"
    shell:
        "dreampipe tiny-model {output.model:q} --tokenizer {output.tokenizer:q} --log {log:q}"

# Quality of a character trained on the toy base model: the attribute classifier shipped beside
# that model scores subject fidelity, prior preservation and language drift (evaluate.py).
# Characters on other base models have no classifier and are not evaluated. The test seeds
# (evaluate.SEED_SETS) are held out: never a class image's, never used to choose a recipe.
rule evaluate:
    input:
        model=exported,
        base=base_model_files,
        fallback=base_fallback,
        instance=f"{R}/{{character}}/instance/0",  # the (first) subject
        classifier=lambda wc: toy_classifier(char(wc)),
    output:
        json=f"{R}/{{character}}/evaluation.json",
        markdown=f"{R}/{{character}}/evaluation.md",
        grid=report(
            f"{R}/{{character}}/evaluation.png",
            caption="../report/evaluation.rst",
            category="{character}",
            subcategory="5 quality",
            labels={"figure": "evaluation"},
        ),
    log:
        f"{R}/{{character}}/logs/evaluate.log",
    conda:
        "../../envs/dreampipe.yaml"
    resources:
        gpu=1,
    params:
        instance_prompt=lambda wc: char(wc)["instance_prompt"],
        class_prompt=lambda wc: char(wc)["class_images"]["class_prompt"],
        class_word=lambda wc: char(wc)["class_word"],
        base=base_model,
        tokenizer=tokenizer_arg,
        base_options=base_options,
    shell:
        "dreampipe evaluate {input.model:q} --base-model {params.base:q} {params.base_options} {params.tokenizer}"
        " --classifier {input.classifier:q} --instance-dir {input.instance:q} --out {output.json:q}"
        " --instance-prompt {params.instance_prompt:q} --class-prompt {params.class_prompt:q}"
        " --class-word {params.class_word:q} --seed-set test --grid {output.grid:q} --log {log:q}"

# The grid draws training's output, not the exported file (the GPU samples both in the same
# bf16), so it runs beside the CPU-bound export instead of after it.
rule sample:
    input:
        model=f"{R}/{{character}}/train/model.safetensors",
        base=base_model_files,
        fallback=base_fallback,
    output:
        report(
            f"{R}/{{character}}/samples/final.png",
            caption="../report/final.rst",
            category="{character}",
            subcategory="4 result",
            labels={"figure": "before/after"},
        ),
    log:
        f"{R}/{{character}}/logs/sample.log",
    benchmark:
        f"{R}/{{character}}/benchmarks/sample.tsv"
    conda:
        "../../envs/dreampipe.yaml"
    resources:
        gpu=1,
    params:
        prompts=lambda wc: " ".join(
            f"--prompt {shlex.quote(p)}" for p in char(wc)["sample"]["prompts"]
        ),
        seeds=lambda wc: shlex.join(map(str, char(wc)["sample"]["seeds"])),
        sampler=lambda wc: char(wc)["sample"]["sampler"],
        steps=lambda wc: char(wc)["sample"]["steps"],
        guidance_scale=lambda wc: char(wc)["sample"]["guidance_scale"],
        resolution=lambda wc: char(wc)["prepare"]["resolution"],
        base=base_model,
        tokenizer=tokenizer_arg,
        base_options=base_options,
    shell:
        "dreampipe sample {input.model:q} --base-model {params.base:q} {params.base_options} --out {output:q} {params.prompts}"
        " --seeds {params.seeds} --sampler {params.sampler:q} --steps {params.steps:q}"
        " --guidance-scale {params.guidance_scale:q}"
        " --resolution {params.resolution:q} {params.tokenizer} --log {log:q}"

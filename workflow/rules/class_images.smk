# The class set is a store shared by every character with the same model and class settings;
# only the manifest of the first N images is an output, so Snakemake never deletes the images:
# a larger N makes only the missing ones, and a killed run keeps what it finished.
rule class_images:
    input:
        lambda wc: CLASS_SETS[wc.set]["model"],
    output:
        f"{R}/class/{{set}}/n{{num}}.json",
        f"{R}/class/{{set}}/n{{num}}.png",
    params:
        args=lambda wc: CLASS_SETS[wc.set]["args"],
    log:
        f"{R}/class/{{set}}/logs/n{{num}}.log",
    resources:
        gpu=1,
    shell:
        "dreampipe class-images {params.args} --num {wildcards.num} --manifest {output[0]:q} --log {log}"

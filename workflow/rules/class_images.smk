# The class set is a store shared by every character with the same model and class settings;
# only the manifest of the first N images is an output, so Snakemake never deletes the images:
# a larger N makes only the missing ones, and a killed run keeps what it finished.
rule class_images:
    input:
        lambda wc: CLASS_SETS[wc.set]["model"],
    output:
        manifest=f"{R}/class/{{set}}/n{{num}}.json",
        sheet=f"{R}/class/{{set}}/n{{num}}.png",
    log:
        f"{R}/class/{{set}}/logs/n{{num}}.log",
    conda:
        "../../envs/dreampipe.yaml"
    resources:
        gpu=1,
    params:
        args=lambda wc: CLASS_SETS[wc.set]["args"],
    shell:
        "dreampipe class-images {params.args} --num {wildcards.num} --manifest {output.manifest:q} --log {log}"

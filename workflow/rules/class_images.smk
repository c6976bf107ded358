# The class set is a store shared by every character with the same model and class settings;
# only the manifest of the first N images is an output, so Snakemake never deletes the images:
# a larger N makes only the missing ones, and a killed run keeps what it finished.
rule class_images:
    input:
        lambda wc: CLASS_SETS[wc.set]["model"],
    output:
        manifest=f"{R}/class/{{set}}/n{{num}}.json",
        contact_sheet=report(
            f"{R}/class/{{set}}/n{{num}}.png",
            caption="../report/class_sheet.rst",
            category="class images",
            labels={"set": "{set}", "images": "{num}"},
        ),
    log:
        f"{R}/class/{{set}}/logs/n{{num}}.log",
    benchmark:
        f"{R}/class/{{set}}/benchmarks/n{{num}}.tsv"
    conda:
        "../../envs/dreampipe.yaml"
    # The batch size changes the speed, not the images: a resource, so changing it reruns nothing.
    resources:
        gpu=1,
        class_batch_size=lambda wc: CLASS_SETS[wc.set]["batch_size"],
    params:
        args=lambda wc: CLASS_SETS[wc.set]["args"],
    shell:
        "dreampipe class-images {params.args} --num {wildcards.num:q} --batch-size {resources.class_batch_size:q}"
        " --manifest {output.manifest:q} --log {log:q}"


# Prepared images as class images: the user's class photos, or the instance images themselves
# of a subject (class_data: instance, the guide's FAQ trick), with the class prompt.
rule class_prepared:
    input:
        f"{R}/{{character}}/{{prepared}}",
    output:
        manifest=f"{R}/{{character}}/{{prepared}}.class.json",
        contact_sheet=f"{R}/{{character}}/{{prepared}}.class.png",
    log:
        f"{R}/{{character}}/logs/{{prepared}}.class.log",
    wildcard_constraints:
        prepared=r"instance/\d+|class_photos",
    conda:
        "../../envs/dreampipe.yaml"
    params:
        class_prompt=prepared_class_prompt,
    shell:
        "dreampipe class-images --prepared {input:q} --manifest {output.manifest:q}"
        " --prompt {params.class_prompt:q} --log {log:q}"

# The class set is a store shared by every character with the same model and class settings;
# only the manifest of the first N images is an output, so Snakemake never deletes the images:
# a larger N makes only the missing ones, and a killed run keeps what it finished.
rule class_images:
    input:
        lambda wc: CLASS_SETS[wc.set]["model"],
    output:
        manifest=f"{R}/class/{{set}}/n{{num}}.json",
        contact_sheet=f"{R}/class/{{set}}/n{{num}}.png",
    log:
        f"{R}/class/{{set}}/logs/n{{num}}.log",
    conda:
        "../../envs/dreampipe.yaml"
    # The batch size changes the speed, not the images: a resource, so changing it reruns nothing.
    resources:
        gpu=1,
        class_batch_size=lambda wc: CLASS_SETS[wc.set]["batch_size"],
    params:
        args=lambda wc: CLASS_SETS[wc.set]["args"],
    shell:
        "dreampipe class-images {params.args} --num {wildcards.num} --batch-size {resources.class_batch_size}"
        " --manifest {output.manifest:q} --log {log}"


# The character's own class photos (class_data: <folder>) are prepared like its instance photos.
rule class_photos:
    input:
        lambda wc: dpprepare.input_files(char(wc)["class_images"]["class_data"]),
    output:
        directory(f"{R}/{{character}}/class_photos"),
    log:
        f"{R}/{{character}}/logs/class_photos.log",
    conda:
        "../../envs/dreampipe.yaml"
    params:
        class_dir=lambda wc: char(wc)["class_images"]["class_data"],
        resolution=lambda wc: char(wc)["prepare"]["resolution"],
        mode=lambda wc: char(wc)["prepare"]["mode"],
        background=lambda wc: char(wc)["prepare"]["background"],
        class_prompt=lambda wc: char(wc)["class_images"]["class_prompt"],
    shell:
        "dreampipe prepare {params.class_dir:q} {output:q} --resolution {params.resolution}"
        " --mode {params.mode} --background {params.background:q}"
        " --instance-prompt {params.class_prompt:q} --log {log}"


# Prepared images as class images: the user's class photos, or the instance images themselves
# (class_data: instance, the guide's FAQ trick), all with the class prompt.
rule class_prepared:
    input:
        f"{R}/{{character}}/{{prepared}}",
    output:
        manifest=f"{R}/{{character}}/{{prepared}}.class.json",
        contact_sheet=f"{R}/{{character}}/{{prepared}}.class.png",
    log:
        f"{R}/{{character}}/logs/{{prepared}}.class.log",
    wildcard_constraints:
        prepared="instance|class_photos",
    conda:
        "../../envs/dreampipe.yaml"
    params:
        class_prompt=lambda wc: char(wc)["class_images"]["class_prompt"],
    shell:
        "dreampipe class-images --prepared {input:q} --manifest {output.manifest:q}"
        " --prompt {params.class_prompt:q} --log {log}"

# Photos -> square training images: each subject's photos (instance/<i>), and the character's own
# class photos when class_images.class_data names a folder (class_photos, with the class prompt).
rule prepare:
    input:
        lambda wc: dpprepare.input_files(photo_dir(wc), masks=prepare_masks(wc)),
    output:
        report(
            directory(f"{R}/{{character}}/{{photos}}"),
            patterns=["contact_{sheet}.png"],
            caption="../report/contact_sheet.rst",
            category="{character}",
            subcategory="1 photos",
            labels={"figure": "{photos}"},
        ),
    log:
        f"{R}/{{character}}/logs/prepare-{{photos}}.log",
    benchmark:
        f"{R}/{{character}}/benchmarks/prepare-{{photos}}.tsv"
    wildcard_constraints:
        photos=r"instance/\d+|class_photos",
    conda:
        "../../envs/dreampipe.yaml"
    threads: 4  # capped at --cores by Snakemake
    params:
        photo_dir=photo_dir,
        resolution=lambda wc: char(wc)["prepare"]["resolution"],
        mode=lambda wc: char(wc)["prepare"]["mode"],
        background=lambda wc: char(wc)["prepare"]["background"],
        gravity=lambda wc: char(wc)["prepare"]["gravity"],
        on_bad_image=lambda wc: char(wc)["prepare"]["on_bad_image"],
        caption=photo_caption,
        masks=lambda wc: shlex.join(["--masks"]) if prepare_masks(wc) else "",
    shell:
        "dreampipe prepare {params.photo_dir:q} {output:q} --resolution {params.resolution:q}"
        " --mode {params.mode:q} --background {params.background:q} --gravity {params.gravity:q}"
        " --on-bad-image {params.on_bad_image:q} --instance-prompt {params.caption:q}"
        " --workers {threads:q} {params.masks} --log {log:q}"

rule prepare:
    input:
        lambda wc: dpprepare.input_files(char(wc)["instance_dir"]),
    output:
        directory(f"{R}/{{character}}/instance"),
    log:
        f"{R}/{{character}}/logs/prepare.log",
    conda:
        "../../envs/dreampipe.yaml"
    threads: workflow.cores
    params:
        instance_dir=lambda wc: char(wc)["instance_dir"],
        resolution=lambda wc: char(wc)["prepare"]["resolution"],
        mode=lambda wc: char(wc)["prepare"]["mode"],
        background=lambda wc: char(wc)["prepare"]["background"],
        gravity=lambda wc: char(wc)["prepare"]["gravity"],
        on_bad_image=lambda wc: char(wc)["prepare"]["on_bad_image"],
        instance_prompt=lambda wc: char(wc)["instance_prompt"],
    shell:
        "dreampipe prepare {params.instance_dir:q} {output:q} --resolution {params.resolution}"
        " --mode {params.mode} --background {params.background:q} --gravity {params.gravity}"
        " --on-bad-image {params.on_bad_image} --instance-prompt {params.instance_prompt:q}"
        " --workers {threads} --log {log}"

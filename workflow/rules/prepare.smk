rule prepare:
    input:
        lambda wc: dpprepare.input_files(subject(wc)["instance_dir"]),
    output:
        directory(f"{R}/{{character}}/instance/{{subject}}"),
    params:
        instance_dir=lambda wc: subject(wc)["instance_dir"],
        resolution=lambda wc: char(wc)["prepare"]["resolution"],
        mode=lambda wc: char(wc)["prepare"]["mode"],
        background=lambda wc: char(wc)["prepare"]["background"],
        instance_prompt=lambda wc: subject(wc)["instance_prompt"],
    log:
        f"{R}/{{character}}/logs/prepare-{{subject}}.log",
    shell:
        "dreampipe prepare {params.instance_dir:q} {output:q} --resolution {params.resolution}"
        " --mode {params.mode} --background {params.background:q}"
        " --instance-prompt {params.instance_prompt:q} --log {log}"

# The resolved settings of each character, for the report (snakemake --report results/report.html).
rule settings:
    output:
        report(
            f"{R}/{{character}}/settings.yaml",
            caption="../report/settings.rst",
            category="{character}",
            subcategory="0 settings",
            labels={"figure": "settings"},
        ),
    log:
        f"{R}/{{character}}/logs/settings.log",
    conda:
        "../../envs/dreampipe.yaml"
    params:
        settings=lambda wc: yaml.safe_dump(char(wc), sort_keys=False),
    shell:
        "printf '%s' {params.settings:q} > {output:q} 2> {log:q}"

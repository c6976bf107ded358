# The image of `snakemake --sdm apptainer` (the Snakefile's container: directive): what `make demo`
# sets up on a fresh Debian machine, installed by that same Makefile target so the two cannot
# drift. torch is PyPI's default build, with CUDA. Build it with `make image`.
FROM debian:bookworm-slim
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 make >/dev/null
WORKDIR /opt/dreampipe
COPY Makefile pyproject.toml README.md ./
COPY workflow workflow
RUN make venv VENV=/opt/venv TORCH=torch && rm -rf /var/lib/apt/lists/* /root/.cache/pip
ENV PATH=/opt/venv/bin:$PATH

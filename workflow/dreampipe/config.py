"""Config and character files: validation with one clear message per mistake, defaults, merging.

Standard library, yaml, jsonschema and omegaconf only: the Snakefile imports this at parse time
(train imports it for model_id and NON_SHAPING_SETTINGS where only the standard library and yaml are
sure to be installed, so the others are imported where they are used).
OmegaConf merges the layers (schema defaults, config.yaml, --config, the character file) and fills
${...} interpolations; the schemas check every value; prompts' {token}-style placeholders are
filled here, per subject.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import string
from pathlib import Path

import yaml

from .errors import DreampipeError
from .files import write_json

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
SECTIONS = ("prepare", "class_images", "train", "export", "sample")
TINY = "tiny"
SUBJECT_KEYS = ("instance_dir", "token", "class_word", "instance_prompt")
# Training settings that change what training writes along the way (sample grids, saved state,
# progressive checkpoints) or how fast it runs, not the weights: changing one reruns nothing, and
# a training that resumes keeps its state.
NON_SHAPING_SETTINGS = ("sample_every_n_steps", "sample_prompts", "sample_seeds", "sample_steps",
                        "sample_guidance_scale", "save_state_every_n_steps", "save_state_every_n_minutes",
                        "keep_state", "save_every_n_steps", "keep_last", "compile", "sample_sheet",
                        "validation_every_n_steps")
# Training settings of one train.method only (the lora method has learning rates of its own).
METHOD_SETTINGS = {"full": ("learning_rate", "text_encoder_learning_rate"),
                   "lora": ("lora_rank", "lora_alpha", "lora_conv_rank", "lora_learning_rate",
                            "lora_text_encoder_learning_rate")}
# class_images.class_data: no class images; the prior loss's target is the base UNet's prediction
PRIOR_PREDICTION = "prior_prediction"
PROMPT_WORDS = ["token", "class_word", "instance_prompt"]  # what {placeholders} of prompts may name
# A character's name is its file's name; it is part of every output path and of shell commands,
# so it is kept to characters that need no quoting anywhere, and short enough for derived names
# (".<name>.safetensors.tmp") to stay under the 255-byte file-name limit.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _schema(name: str) -> dict:
    return yaml.safe_load((SCHEMAS / f"{name}.schema.yaml").read_text())


def _registry():
    from referencing import Registry, Resource  # here: train uses model_id where jsonschema is absent

    return Registry().with_resource("config.schema.yaml", Resource.from_contents(_schema("config")))


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise DreampipeError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise DreampipeError(f"{path}: expected key: value pairs at the top level")
    return data


def validate(data: dict, schema_name: str, path) -> None:
    """Raise one DreampipeError naming the file, the key and the fix for the first mistake."""
    import jsonschema

    schema = _schema(schema_name)
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.path), list(map(str, e.path))))
    if not errors:
        return
    e = errors[0]
    where = ".".join(map(str, e.path))
    resolved = validator.evolve(schema=e.schema)
    if e.validator == "additionalProperties":
        allowed = list(_properties(resolved, e.schema))
        for key in e.instance:
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
                full = f"{where}.{key}" if where else key
                hint = (f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(allowed))
                raise DreampipeError(f"{path}: unknown key '{full}'; {hint}")
    if e.validator == "required":
        raise DreampipeError(f"{path}: {e.message}; add it (see config/README.md)")
    raise DreampipeError(f"{path}: {where or 'top level'}: {e.message}")


def _properties(validator, schema: dict) -> dict:
    if "$ref" in schema:
        return validator._resolver.lookup(schema["$ref"]).contents.get("properties", {})
    return schema.get("properties", {})


def defaults(schema: dict | None = None) -> dict:
    """The default value of every key of config.schema.yaml, sections included."""
    schema = schema or _schema("config")
    out = {}
    for key, prop in schema["properties"].items():
        if prop.get("type") == "object":
            out[key] = defaults(prop)
        elif "default" in prop:
            out[key] = copy.deepcopy(prop["default"])
    return out


INTERPOLATION_HINT = ("${key} is another key's value, e.g. ${class_word}; ${oc.env:NAME} an environment "
                      "variable; \\${ a literal ${")


def merge(*layers: dict, data: dict, path, configfile, resolve: bool = True) -> dict:
    """The layers merged, later ones overriding earlier ones key by key (lists are replaced whole),
    with ${...} interpolations filled (if `resolve`). A bad interpolation is one line naming its key
    and the file it was written in: `path`, where `data` came from, or else config.yaml."""
    from omegaconf import OmegaConf  # here: train imports this module where only model_id is needed
    from omegaconf.errors import GrammarParseError, InterpolationKeyError, OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.merge(*layers), resolve=resolve)
    except OmegaConfBaseException as e:
        message = (e.msg or str(e)).strip().splitlines()[0]
        env = re.search(r"Environment variable '([^']+)' not found", message)
        if isinstance(e, InterpolationKeyError):
            what = message[0].lower() + message[1:]
        elif isinstance(e, GrammarParseError):
            what = "${...} that does not parse"
        else:
            what = f"environment variable '{env.group(1)}' not found" if env else message
        origin = path if _given(data, e.full_key) else configfile
        raise DreampipeError(f"{origin}: {e.full_key}: {what} ({INTERPOLATION_HINT})") from None


def _given(data, key: str) -> bool:
    """Whether dotted `key` (sample.prompts[0]) is set in `data`."""
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return False
    return True


def load(config: dict, workdir: Path = Path("."), configfile: str = "config/config.yaml") -> tuple[dict, dict]:
    """(global config with defaults, {character name: resolved settings}) of the selected characters."""
    workdir = Path(workdir)
    validate(config, "config", configfile)
    # sections are resolved per character, where ${class_word} and the character's own keys are
    # known; the keys of the whole run here
    cfg = merge(defaults(), config, data=config, path=configfile, configfile=configfile, resolve=False)
    run_keys = ("characters_dir", "characters", "results")
    cfg.update(merge({k: cfg[k] for k in run_keys}, data=config, path=configfile, configfile=configfile))
    selected = cfg["characters"]
    if isinstance(selected, str):
        selected = [s.strip() for s in selected.split(",") if s.strip()]
    char_dir = workdir / cfg["characters_dir"]
    available = sorted(p.stem for p in char_dir.glob("*.yaml")) if char_dir.is_dir() else []
    if not available:
        raise DreampipeError(f"{char_dir}: no character files; copy config/characters/example.yaml "
                             "to config/characters/<name>.yaml")
    for name in selected or []:
        if name not in available:
            near = difflib.get_close_matches(name, available, n=1)
            raise DreampipeError(f"--config characters: no character '{name}' in {char_dir}"
                                 + (f"; did you mean '{near[0]}'?" if near else f" (have: {', '.join(available)})"))
    return cfg, {name: character(cfg, char_dir / f"{name}.yaml", workdir, configfile=configfile)
                 for name in (selected or available)}


def character(cfg: dict, path: Path, workdir: Path, *, configfile: str = "config/config.yaml") -> dict:
    if not NAME.fullmatch(path.stem):
        raise DreampipeError(f"{path}: the character name (the file name) may only use letters, digits, "
                             "_, - and . (starting with a letter or digit, at most 100); rename the file")
    data = read_yaml(path)
    validate(data, "character", path)
    top = {k: data[k] for k in SUBJECT_KEYS if k in data}
    if "subjects" in data and top:
        raise DreampipeError(f"{path}: {', '.join(top)} given beside subjects; move them into the subjects list")
    for key in () if "subjects" in data else SUBJECT_KEYS[:3]:
        if key not in data:
            raise DreampipeError(f"{path}: '{key}' is a required property; add it (see config/README.md)")
    merged = merge({k: v for k, v in cfg.items() if k not in ("characters", "characters_dir")}, data,
                   data=data, path=path, configfile=configfile)
    top = {k: merged[k] for k in top}
    c = {k: v for k, v in merged.items() if k not in SUBJECT_KEYS and k != "subjects"}
    for section, key in (("sample", "prompts"), ("train", "sample_prompts")):
        origin = path if key in data.get(section, {}) else configfile
        for prompt in c[section][key]:
            check_placeholders(prompt, PROMPT_WORDS, f"{origin}: {section}.{key}")
    fallback = c["base_model_fallback"]
    if fallback and not (workdir / fallback).is_file():
        raise DreampipeError(f"{path if 'base_model_fallback' in data else configfile}: base_model_fallback "
                             f"'{fallback}' is not a file; set it to a full SD 1.x checkpoint (.ckpt or "
                             ".safetensors) or remove it")
    c["subjects"] = [subject(s, c, path, workdir) for s in merged.get("subjects", [top])]
    tokens = [s["token"] for s in c["subjects"]]
    if len(set(tokens)) < len(tokens):
        raise DreampipeError(f"{path}: subjects share a token ({', '.join(tokens)}); give each its own rare word")
    c.update({k: c["subjects"][0][k] for k in SUBJECT_KEYS})  # the (first) subject, for single-subject use
    c["class_images"]["class_prompt"] = c["subjects"][0]["class_prompt"]
    c["sample"]["prompts"] = for_each_subject(c["sample"]["prompts"], c["subjects"])
    c["train"]["sample_prompts"] = for_each_subject(c["train"]["sample_prompts"], c["subjects"])
    if c["prepare"]["resolution"] % 64:
        raise DreampipeError(f"{path}: prepare.resolution is {c['prepare']['resolution']}; it must be "
                             "a multiple of 64 (e.g. 512)")
    train = c["train"]
    if train["validation_photos"] and not train["validation_every_n_steps"]:
        raise DreampipeError(f"{path}: train.validation_photos is {train['validation_photos']} but the validation "
                             "loss is never measured (train.validation_every_n_steps is off), so those photos would "
                             "be left out of training for nothing; set validation_photos: 0 or validation_every_n_steps")
    c["name"] = path.stem
    return c


def subject(data: dict, c: dict, path: Path, workdir: Path) -> dict:
    """One subject with its prompts filled in."""
    instance_dir = Path(data["instance_dir"])
    if not (workdir / instance_dir).is_dir():
        raise DreampipeError(f"{path}: instance_dir '{instance_dir}' is not a folder; create it and "
                             "put 5-20 photos of the character in it, or fix the path")
    words = {"token": data["token"], "class_word": data["class_word"]}
    check_placeholders(data.get("instance_prompt", ""), list(words), f"{path}: instance_prompt")
    return {**data, **words,
            "instance_prompt": data.get("instance_prompt", "a photo of {token} {class_word}").format(**words),
            "class_prompt": (data.get("class_prompt") or c["class_images"]["class_prompt"]
                             or f"a photo of a {data['class_word']}")}


def check_placeholders(prompt: str, allowed: list[str], where: str) -> None:
    """Refuse a prompt whose {placeholders} are not all in `allowed`, or that has a lone brace."""
    words = " or ".join(", ".join(f"{{{w}}}" for w in allowed).rsplit(", ", 1))
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(prompt) if field is not None]
    except ValueError:
        raise DreampipeError(f"{where}: '{prompt}' has a brace that opens or closes no placeholder; "
                             f"write {{{{ or }}}} for a brace itself (placeholders: {words})") from None
    for field in fields:
        if field not in allowed:
            raise DreampipeError(f"{where}: '{prompt}' has an unknown placeholder {{{field}}}; use {words} "
                                 "(or {{ and }} for a brace itself)")


def for_each_subject(prompts: list[str], subjects: list[dict]) -> list[str]:
    """Prompts with {token}, {class_word}, {instance_prompt} filled in, once per subject that changes them."""
    return list(dict.fromkeys(p.format(**s) for p in prompts for s in subjects))


def train_settings(c: dict) -> dict:
    """Everything training is told: the train section (but the other method's keys: changing them
    reruns nothing), the image resolution, and the sample section (sample_sheet: the train job
    draws the sample job's rows, sample.py); with class_images.class_data prior_prediction, each
    subject's class prompt (prior_prediction)."""
    settings = {**method_settings(c["train"], c["train"]["method"]), "resolution": c["prepare"]["resolution"],
                "sample_sheet": c["sample"]}
    if c["class_images"]["class_data"] == PRIOR_PREDICTION:
        settings["prior_prediction"] = [s["class_prompt"] for s in c["subjects"]]
    return settings


def method_settings(train: dict, method: str) -> dict:
    """The train section without the keys of the train.method other than `method`."""
    other = {k for m, keys in METHOD_SETTINGS.items() if m != method for k in keys}
    return {k: v for k, v in train.items() if k not in other}


def split_train_settings(c: dict) -> tuple[dict, dict]:
    """(settings that shape the trained weights, NON_SHAPING_SETTINGS): only the first are tracked
    by Snakemake, so a sampling, saving or speed change does not retrain."""
    settings = train_settings(c)
    return ({k: v for k, v in settings.items() if k not in NON_SHAPING_SETTINGS},
            {k: v for k, v in settings.items() if k in NON_SHAPING_SETTINGS})


def model_files(path: str) -> list[str]:
    """The files a base model is made of: the file itself, or every file of a diffusers folder
    (weights and configs; hidden files left out). Sorted: Snakemake inputs and hashes stay stable."""
    p = Path(path)
    if not p.is_dir():
        return [str(path)]
    return sorted(str(f) for f in p.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))


def model_id(path: str, cache: Path) -> str:
    """Content hash of a base model (a file, or every file of a diffusers folder), each file's hash
    cached by (path, size, mtime) so parsing stays instant. A path that does not exist is its own id."""
    p = Path(path)
    if not p.exists():
        return str(path)
    try:
        known = json.loads(cache.read_text()) if cache.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        known = {}  # a damaged cache is rebuilt, not trusted
    hashes, changed = [], False
    for f in map(Path, model_files(path)):
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in known:
            h = hashlib.sha256()
            with f.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 24), b""):
                    h.update(block)
            known[key], changed = h.hexdigest()[:16], True
        hashes.append(f"{f.relative_to(p) if p.is_dir() else ''}:{known[key]}")
    if changed:
        write_json(known, cache)
    if p.is_file():
        return known[key]
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16]


def reference_markdown() -> str:
    """config/README.md: every key of both schemas with its default and meaning."""
    config, char = _schema("config"), _schema("character")
    lines = ["# Configuration reference", "",
             "Generated from workflow/schemas/*.schema.yaml by `dreampipe config-docs`; a test keeps "
             "them in step.", "",
             "`config/config.yaml` holds the shared defaults; `config/characters/<name>.yaml` holds one "
             "character and may override any section below.", "",
             "Any string value may use OmegaConf interpolation, filled per character: `${class_word}` (another "
             "key's value), `${oc.env:HOME}` (an environment variable); `\\${` is a literal `${`. Prompts "
             "also take `{token}`, `{class_word}` and `{instance_prompt}`, filled per subject (`{{`, `}}` "
             "for braces).", "", "## Character file", "",
             "| key | default | meaning |", "|---|---|---|"]
    for key, prop in char["properties"].items():
        if "$ref" not in prop:
            lines.append(_row(key, prop, required=key in char.get("required", [])))
    lines += ["", "## config/config.yaml (and character overrides)", "",
              "| key | default | meaning |", "|---|---|---|"]
    for key, prop in config["properties"].items():
        if prop.get("type") == "object":
            lines += [_row(f"{key}.{sub}", p) for sub, p in prop["properties"].items()]
        else:
            lines.append(_row(key, prop))
    return "\n".join(lines) + "\n"


def _row(key: str, prop: dict, required: bool = False) -> str:
    default = "required" if required else f"`{json.dumps(prop.get('default'))}`"
    meaning = " ".join(prop.get("description", "").split())
    return f"| `{key}` | {default} | {meaning.replace('|', chr(92) + '|')} |"

"""Run configuration read from YAML or TOML (data, never executed) into the typed, frozen sections of config_schema.py,
with `section.key=value` overrides (a dotted key sets one entry: data.augment.rotation=20).

    cfg = load_config("wflw_lgrn_r34", ["optim.lr=0.02", "train.epochs=10"])

A name without a path is a config shipped in structalign/configs/. A top-level `base: NAME` reads config NAME (beside
this file, else a shipped one) and merges this file over it, mappings key by key. Unknown keys, values of the wrong type
or out of range and a missing data root raise a one-line ConfigError before any work starts.
"""
import os
import re
import tomllib
from importlib import resources

import yaml

from structalign.engine.config_schema import Config, ConfigError, OptimConfig, config_from_dict  # noqa: F401 (API)


class _Yaml(yaml.SafeLoader):
    """YAML with the floats of YAML 1.2: 1e-3 is a number (PyYAML's YAML 1.1 reads it as a string)."""


_Yaml.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                            "-+.0123456789")


def parse_override(text: str) -> tuple[str, str, object]:
    """"section.key=value" -> (section, key, value parsed as a YAML scalar or list)."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. optim.lr=0.02")
    try:
        return section, key, yaml.load(value, _Yaml) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value ({' '.join(str(exc).split())})") from None


def resolve_config_path(name: str, near: str | None = None) -> str:
    """A path as given if it exists, else a config in folder `near`, else a shipped one (each with or without .yaml)."""
    if os.path.exists(name):
        return name
    shipped = str(resources.files("structalign") / "configs")
    for candidate in (os.path.join(folder, n) for folder in (near, shipped) if folder for n in (name, name + ".yaml")):
        if os.path.isfile(candidate):
            return candidate
    known = sorted(n for n in os.listdir(shipped) if n.endswith((".yaml", ".toml")))
    raise ConfigError(f"config {name!r}: no such file, and no shipped config of that name; shipped: {known}")


def merged(base: dict, over: dict) -> dict:
    """`over` merged into `base`: mappings key by key (recursively), anything else replaced by `over`'s value."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str, seen: tuple = ()) -> dict:
    """The mapping of sections in a YAML or TOML file, merged over its `base` config if it names one."""
    toml = path.endswith(".toml")
    try:
        with open(path, "rb") as f:
            raw = (tomllib.load(f) if toml else yaml.load(f, _Yaml)) or {}
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if toml else 'YAML'}: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if "base" not in raw:
        return raw
    seen = (*seen, os.path.realpath(path))
    base = resolve_config_path(str(raw.pop("base")), near=os.path.dirname(path) or ".")
    if os.path.realpath(base) in seen:
        raise ConfigError(f"{path}: base: {base} is this config or one it is based on (a cycle)")
    return merged(read_config_file(base, seen), raw)


def load_config(name: str, overrides=(), check_data: bool = True) -> Config:
    """Read a config (over its base), apply `section.key=value` overrides, check it (and the data root, if asked)."""
    path = resolve_config_path(name)
    raw = read_config_file(path)
    for text in overrides:  # each sets one value, replacing it (data.augment.rotation=20: one key of data.augment)
        section, key, value = parse_override(text)
        *parents, leaf = [section, *key.split(".")]
        node = raw
        for part in parents:
            node[part] = node[part] if isinstance(node.get(part), dict) else {}
            node = node[part]
        node[leaf] = value
    cfg = config_from_dict(raw, source=path)
    if check_data:
        check_data_root(cfg)
    return cfg


def check_data_root(cfg: Config) -> None:
    if not os.path.isdir(cfg.data.root):
        raise ConfigError(f"data.root: {cfg.data.root!r} is not a directory (render the built-in data with "
                          f"`structalign data synth {cfg.data.root}` or point data.root at your dataset)")


def check_paths(cfg: Config, resume: str | None) -> None:
    """ConfigError naming the first path of a training run (data, checkpoints, output folder) that cannot be used."""
    check_data_root(cfg)
    if resume not in (None, "auto") and not os.path.isfile(resume):
        raise ConfigError(f"--resume: checkpoint {resume!r} does not exist")
    if cfg.model.init_from is not None and not os.path.isfile(cfg.model.init_from):
        raise ConfigError(f"model.init_from: checkpoint {cfg.model.init_from!r} does not exist")
    if os.path.exists(cfg.train.out_dir) and not os.path.isdir(cfg.train.out_dir):
        raise ConfigError(f"train.out_dir: {cfg.train.out_dir!r} exists and is not a directory")

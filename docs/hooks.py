"""MkDocs hooks: the version of eqx_dodge in the footer of every page."""

import pathlib
import tomllib


def on_config(config):
    pyproject = pathlib.Path(config["config_file_path"]).parent / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    config["copyright"] = f"eqx_dodge {version}"
    return config

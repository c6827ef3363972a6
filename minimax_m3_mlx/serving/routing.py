"""Which model a request may name: the server serves the model it loaded, and only that one.

mlx-lm's server takes a request's `model` as a path or Hugging Face repo to load, so any
client could make the server load another folder from its disk (and drop the served
model while it does). Here a request names the served model by any of:

- a name given with `--served-model-name NAME[,NAME...]` (what clients and agent
  frameworks send, e.g. "minimax-m3");
- the path as given to `--model`, its resolved form, or its folder name;
- mlx-lm's "default_model", or no `model` at all.

/v1/models lists the served names and the resolved path. Any other name is a 404 with
code `model_not_found` that lists them; nothing is ever loaded for a request
(`ServedModels.check` runs before the request is queued, and the provider's `load`
refuses any name as a second line).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from .http_errors import RequestError

DEFAULT = "default_model"  # mlx-lm's name for the model given on the command line


def served_names(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty name in {text!r} (give NAME[,NAME...])")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--served-model-name", type=served_names, default=[], metavar="NAME[,NAME...]",
                   help="names a request's `model` may give for the served model, listed first by /v1/models "
                        "(besides --model's path and its folder name)")


class ModelNotServed(RequestError):
    def __init__(self, name: str, ids: List[str]):
        super().__init__(f"model {name!r} is not served here; this server serves: {', '.join(ids)}",
                         param="model", code="model_not_found", status=404)


class ServedModels:
    """The names of the one served model: `ids` (listed by /v1/models) and every alias."""

    def __init__(self, model: str, names: List[str]):
        given = Path(model).expanduser()
        path = given.resolve() if given.exists() else None
        self.ids = list(dict.fromkeys([*names, str(path) if path else str(model)]))
        aliases = {*self.ids, DEFAULT, str(model), str(given)}
        if path is not None:
            aliases |= {str(path), path.name, given.name}
        self.aliases = frozenset(aliases)

    def __contains__(self, name) -> bool:
        return name in self.aliases

    def check(self, name) -> None:
        """Raise ModelNotServed (404) for a name that is not the served model's."""
        if name not in self.aliases:
            raise ModelNotServed(str(name), self.ids)

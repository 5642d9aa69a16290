"""Output paths built from names (study names, MLflow experiment names): checked to stay inside their
directory, whatever the name holds (``params.yaml`` names are also validated: ``params.NAME_PATTERN``)."""
from pathlib import Path
from typing import Union

from pipeline.params import ParamError


class UnsafePath(ParamError):
    """A name that would put a file outside its directory (a stage prints it as one line)."""


def inside(directory: Union[str, Path], *parts: str) -> Path:
    """``directory / parts...``, refused unless it resolves (symbolic links followed) to a path under
    ``directory``; e.g. ``inside("results/studies", "../../x.json")`` raises UnsafePath."""
    directory = Path(directory)
    path = directory.joinpath(*parts)
    root = directory.resolve()
    resolved = path.resolve()
    if resolved == root or root not in resolved.parents:
        raise UnsafePath(f"{path}: outside {directory} (from the name {'/'.join(map(str, parts))!r}); "
                         f"names may hold letters, digits, '_', '.', '-' only")
    return path

"""Output paths tfmm may write: never over a user's files.

A command that writes a directory (``prepare``/``generate`` replace theirs
whole; ``embed`` and an export add files to theirs) first calls
`check_output_dir`, which refuses, in one line and before anything is
written, an output directory that

- is an input of the command or holds one (``--out_dir=mydata`` where
  ``mydata/impressions.csv`` is read), or
- exists, is not empty and was not written by tfmm (`written_by_tfmm`: a
  ``.tfmm-output`` marker, or a data directory's ``metadata.json``; a command
  may recognise its own kind, e.g. a SavedModel base of version directories).

A command that writes a file (``tfmm.index export --out``) calls
`check_output_file`: never an input or a file inside an input directory, never
an existing file it cannot tell is its own.

So a rerun into tfmm's own output works, and a slip of the flag loses nothing::

    check_output_dir("data/mine", "out_dir", inputs=["my_data/impressions.csv"])
    mark("data/mine.tmp-123")   # in the directory being written
"""

import json
import os

MARKER = ".tfmm-output"


def mark(directory, command=None):
    """Marks `directory` (existing) as written by tfmm, so a rerun may replace it."""
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump({"written_by": command or "tfmm"}, f)


def written_by_tfmm(directory):
    """Whether `directory` holds tfmm's marker or a tfmm data directory's metadata.json."""
    if os.path.isfile(os.path.join(directory, MARKER)):
        return True
    try:  # data directories written before the marker existed
        with open(os.path.join(directory, "metadata.json")) as f:
            return json.load(f).get("format", "").startswith("tfmm-")
    except (OSError, ValueError, AttributeError):
        return False


def _inside(path, directory):
    """Whether `path` is `directory` or lies inside it (both real paths)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_output_file(path, flag, inputs=(), owned=lambda path: False):
    """Raises ValueError (one line naming `flag`) when the file `path` may not be
    written: it is a directory, one of `inputs` or inside one, or an existing file
    that `owned` does not recognise as tfmm's."""
    real = os.path.realpath(path)
    for source in inputs:
        if source and _inside(real, os.path.realpath(source)):
            where = "is" if real == os.path.realpath(source) else "lies in"
            raise ValueError(f"--{flag}={path} {where} the input {source}: choose another "
                             f"--{flag}.")
    if os.path.isdir(path):
        raise ValueError(f"--{flag}={path} is a directory; name a file.")
    if os.path.exists(path) and not owned(path):
        raise ValueError(f"--{flag}={path} is a file tfmm did not write; it is left alone: "
                         f"give a new --{flag}.")


def check_output_dir(path, flag, inputs=(), owned=written_by_tfmm):
    """Raises ValueError (one line naming `flag`) when `path` may not be written.

    Args:
        path: the output directory (need not exist).
        flag: its flag name, for the message.
        inputs: paths the command reads (files or directories; None entries are
            skipped); the output may be neither one of them nor hold one.
        owned: of an existing non-empty directory, whether tfmm wrote it.
    """
    real = os.path.realpath(path)
    for source in inputs:
        if source and _inside(os.path.realpath(source), real):
            held = "is" if os.path.realpath(source) == real else "holds"
            raise ValueError(f"--{flag}={path} {held} the input {source}; an output directory "
                             f"must not hold what the command reads: choose another --{flag}.")
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise ValueError(f"--{flag}={path} is a file, not a directory; choose another --{flag}.")
    if os.listdir(path) and not owned(path):
        raise ValueError(f"--{flag}={path} is a non-empty directory tfmm did not write; its "
                         f"files are left alone: give a new or empty --{flag}.")


def claim_dir(path, flag, inputs=(), owned=written_by_tfmm, command=None):
    """`check_output_dir`, then makes `path` and marks it as tfmm's (a report directory,
    a pipeline's work directory)."""
    check_output_dir(path, flag, inputs, owned)
    os.makedirs(path, exist_ok=True)
    mark(path, command)

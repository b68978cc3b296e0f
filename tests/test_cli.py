"""The command-line tools: flags defined only by the program that runs, no import circle,
and the runner they share (`tfmm.cli`)."""

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tfmm", "pipelines", "benchmarks")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
# The tools with --world and --data_dir (the world generated into the data dir where asked).
DATA_TOOLS = ["tfmm.train", "tfmm.serving.predict", "pipelines.paper", "pipelines.table2",
              "benchmarks.distribute", "benchmarks.embed", "benchmarks.input_pipeline",
              "pipelines.never_hurts"]


def modules():
    """{module name: path} of every module of our packages, entry points included."""
    found = {}
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


def import_graph():
    """{module: the modules of ours it imports anywhere in its code (lazy imports too)}."""
    found = modules()

    def resolve(name):  # the module itself, else the package that holds the name
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in found.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                edges.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                edges.update(f"{base}.{a.name}" if f"{base}.{a.name}" in found else resolve(base)
                             for a in node.names)
        graph[module] = edges - {module, ""}
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_our_modules():
    graph = import_graph()
    assert cycles(graph) == []
    assert "tfmm.data.prepare_beam" in graph["tfmm.data.prepare"]  # lazy imports count too


def _defines_flags(node):
    """Whether a statement calls flags.DEFINE_*, a define_flags or register_validator."""
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            name = getattr(call.func, "attr", getattr(call.func, "id", ""))
            if name.startswith("DEFINE") or name in ("define_flags", "register_validator"):
                return True
    return False


def _is_main_block(node):
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and getattr(node.test.left, "id", None) == "__name__")


def test_module_level_code_defines_no_flag():
    """Flags are defined in functions, called only under ``if __name__ == "__main__"``."""
    found = {}
    for module, path in modules().items():
        tree = ast.parse(open(path).read())
        lines = [node.lineno for node in tree.body
                 if not isinstance(node, (ast.FunctionDef, ast.ClassDef))
                 and not _is_main_block(node) and _defines_flags(node)]
        if lines:
            found[module] = lines
    assert found == {}


@pytest.mark.slow
def test_importing_every_module_defines_no_flag():
    code = ("import importlib, json, sys\nfrom absl import flags\n"
            "for name in sys.argv[1:]:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted(flags.FLAGS.flags_by_module_dict())))")
    names = sorted(modules())
    assert {"tfmm.train", "tfmm.data.prepare", "tfmm.serving.predict", "tfmm.index.__main__",
            "pipelines.movielens", "benchmarks.embed"} <= set(names)
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    defined_by = json.loads(proc.stdout.splitlines()[-1])
    assert "absl.logging" in defined_by  # absl's own, to show the list is the real one
    assert not [m for m in defined_by if m.split(".")[0] in PACKAGES + ("__main__",)]


def _run(code, *argv):
    """A program `code` (Python, defining flags and calling `cli.run`) run with `argv`."""
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)


def _last_line(proc):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


PROGRAM = """
import sys

from absl import flags, logging
from tfmm import cli
from tfmm.config import SettingsError

def main(argv):
    logging.info("an INFO line")
    if flags.FLAGS.raise_settings:
        raise SettingsError("--x=1: bad setting.")
    if flags.FLAGS.raise_value:
        raise ValueError("a/b.csv: row 2: bad cell.")
    print("ran", argv)

flags.DEFINE_bool("raise_settings", False, "")
flags.DEFINE_bool("raise_value", False, "")
flags.DEFINE_bool("catch_value", False, "")
cli.run(main, errors=(ValueError,) if "--catch_value" in sys.argv else ())
"""


def test_runner_errors_are_one_line_and_logs_quiet():
    assert _last_line(_run(PROGRAM, "stray")) == "unexpected arguments: ['stray']"
    assert _last_line(_run(PROGRAM, "--raise_settings")) == "--x=1: bad setting."
    assert _last_line(_run(PROGRAM, "--raise_value", "--catch_value")) == (
        "a/b.csv: row 2: bad cell.")
    # Other errors are the tool's bugs: their traceback shows.
    assert "Traceback" in _run(PROGRAM, "--raise_value").stderr
    quiet, verbose = _run(PROGRAM), _run(PROGRAM, "--verbose")
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert quiet.stdout == verbose.stdout == "ran ['-c']\n"
    assert "an INFO line" not in quiet.stderr and "an INFO line" in verbose.stderr


def data_flags(*argv):
    """New FlagValues with --world and --data_dir, parsed from `argv`."""
    from absl import flags

    from tfmm import cli

    values = flags.FlagValues()
    cli.define_data_flags(flag_values=values)
    values(["tool", *argv])
    return values


def _refusal(flag_values, generate):
    from tfmm import cli

    with pytest.raises(SystemExit) as refused:
        cli.data_dir(generate, flag_values)
    return refused.value.code


@pytest.mark.parametrize("generate", [False, True])
def test_a_data_dir_without_data_is_refused_unless_world_is_given(tmp_path, monkeypatch,
                                                                  generate):
    from tfmm import cli

    monkeypatch.chdir(tmp_path)
    typo, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    hint = "; give --world to generate a synthetic world there." if generate else "."
    assert _refusal(data_flags(f"--data_dir={typo}"), generate) == (
        f"--data_dir={typo} does not exist{hint}")
    assert _refusal(data_flags(f"--data_dir={empty}"), generate) == (
        f"--data_dir={empty} holds no tfmm data (no metadata.json){hint}")
    assert not typo.exists() and not os.listdir(empty)
    (empty / "metadata.json").write_text("{}")
    assert cli.data_dir(generate, data_flags(f"--data_dir={empty}")) == str(empty)
    if not generate:  # the default data/<world>, or any dir with --world: the tool's to fill
        assert cli.data_dir(False, data_flags("--world=tiny")) == os.path.join("data", "tiny")
        assert cli.data_dir(False, data_flags(f"--data_dir={typo}", "--world=tiny")) == str(typo)


def test_world_presets_come_from_the_world():
    from tfmm.data import world

    assert data_flags()["world"].parser.enum_values == list(world.PRESETS)


def test_a_missing_extra_is_named_with_its_install_command():
    code = ("import sys; sys.modules['apache_beam'] = None\n"
            "from tfmm import cli\ncli.require_extra('beam', '--runner=DirectRunner')")
    assert _last_line(_run(code)) == (
        '--runner=DirectRunner needs Apache Beam, an extra of tfmm: pip install -e ".[beam]"')
    assert _run("from tfmm import cli; cli.require_extra('beam', '--runner=X')").returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("tool", DATA_TOOLS)
def test_every_tool_refuses_a_mistyped_data_dir(tool, tmp_path):
    typo = tmp_path / "data" / "smal"
    proc = subprocess.run([sys.executable, "-m", tool, f"--data_dir={typo}"], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True)
    hint = "." if tool in ("tfmm.serving.predict", "pipelines.never_hurts") else \
        "; give --world to generate a synthetic world there."
    assert _last_line(proc) == f"--data_dir={typo} does not exist{hint}"
    assert os.listdir(tmp_path) == []  # nothing generated, nothing written

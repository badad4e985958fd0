"""docs/method.md against the code: every "§N" citation resolves to a heading, and the constants in its tables
are the code's (so the document cannot drift from what runs)."""
import inspect
import re
from pathlib import Path

import pytest
import yaml

from structalign import losses, metrics
from structalign.data.sampling import pose_balance_repeats
from structalign.engine.config import load_config
from structalign.engine.evaluate import EvalResult
from structalign.landmarks import SCHEMES
from structalign.losses import laplacian_relations
from structalign.models.landmark_graphs import message_graph
from structalign.ops import relative_location_loss
from structalign.ops.reference import relative_location_loss_dense, relative_location_loss_reference

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "method.md"
CITING = ("structalign", "kernels", "csrc", "tools", "benchmarks", "tests", "configs", "README.md")
TEXT_SUFFIXES = {".py", ".pyi", ".yaml", ".yml", ".toml", ".md", ".txt", ".h", ".hpp", ".cpp", ".cc", ".cu", ".cuh"}
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\s")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)?)(?:\s*[-–]\s*(\d+(?:\.\d+)?))?")
DOC_NAME = re.compile(r"([\w./-]*)method\.md")


def doc_text() -> str:
    if not DOC.is_file():
        pytest.fail(f"{DOC.relative_to(ROOT)} does not exist: the code cites its sections")
    return DOC.read_text(encoding="utf-8")


def section_numbers(text: str) -> set:
    """The numbers of the document's numbered headings ("### 1.3 Graph convolution" -> "1.3")."""
    return {m.group(1) for line in text.splitlines() if (m := HEADING.match(line))}


def cited_sections(line: str) -> list:
    """The section numbers a line cites: every §N, §N.M, and each member of a range §N.M-N.K."""
    cited = []
    for first, last in SECTION.findall(line):
        cited.append(first)
        if last:
            major, lo = first.split(".") if "." in first else (first, None)
            hi_major, hi = last.split(".") if "." in last else (last, None)
            if lo is not None and hi is not None and major == hi_major:
                cited.extend(f"{major}.{k}" for k in range(int(lo) + 1, int(hi) + 1))
            else:
                cited.append(last)
    return cited


def citation_problems(path: str, text: str, sections: set) -> list:
    """'path:line: problem' for each § that names no section, and each method.md named by another path."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for cited in cited_sections(line):
            if cited not in sections:
                problems.append(f"{path}:{number}: §{cited} is no section of docs/method.md")
        for prefix in DOC_NAME.findall(line):
            if prefix not in ("", "docs/"):
                problems.append(f"{path}:{number}: cites {prefix}method.md; cite it as method.md or docs/method.md")
    return problems


def citing_files():
    this = Path(__file__).resolve()
    for name in CITING:
        top = ROOT / name
        paths = [top] if top.is_file() else sorted(top.rglob("*")) if top.is_dir() else []
        for path in paths:
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts and path != this:
                yield path


def section_text(text: str, number: str) -> str:
    """The lines under heading `number`, up to the next heading."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("#"):
            match = HEADING.match(line)
            inside = bool(match) and match.group(1) == number
            continue
        if inside:
            lines.append(line)
    if not lines:
        pytest.fail(f"docs/method.md has no section {number}")
    return "\n".join(lines)


def table_rows(text: str, number: str) -> dict:
    """{first cell without backticks: the other cells} of the table rows in section `number` (header and rule
    skipped)."""
    lines = [line for line in section_text(text, number).splitlines() if line.startswith("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0]:
            rows[cells[0].strip("`")] = cells[1:]
    if not rows:
        pytest.fail(f"section {number} of docs/method.md has no table")
    return rows


def int_list(cell: str) -> list:
    """'33, 42, 54' -> [33, 42, 54], '36–41' -> [36, ..., 41], 'none' -> []."""
    if cell == "none":
        return []
    out = []
    for item in cell.split(","):
        lo, _, hi = item.strip().replace("–", "-").partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def plain(value):
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_every_citation_resolves_to_a_heading():
    sections = section_numbers(doc_text())
    problems = [p for path in citing_files()
                for p in citation_problems(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"), sections)]
    assert not problems, "unresolved method.md citations:\n" + "\n".join(problems)


def test_the_checker_flags_what_does_not_resolve():
    sections = {"1", "1.3", "1.4", "1.5", "2", "2.1"}
    assert citation_problems("f.py", "see method.md §1.3-1.5 and §2.1", sections) == []
    assert citation_problems("f.py", "method.md §1.3-1.6", sections) == [
        "f.py:1: §1.6 is no section of docs/method.md"]
    assert citation_problems("f.py", "x\n(docs/method.md §9.9)", sections) == [
        "f.py:2: §9.9 is no section of docs/method.md"]
    assert citation_problems("f.py", "../shared/method.md §2", sections) == [
        "f.py:1: cites ../shared/method.md; cite it as method.md or docs/method.md"]


def test_recipe_table_is_the_lgrn_r34_config():
    cfg = load_config("lgrn_r34_base", check_data=False)
    rows = table_rows(doc_text(), "1.6")
    for key, (value, _paper) in rows.items():
        current = cfg
        for part in key.split("."):
            current = getattr(current, part)
        assert yaml.safe_load(value) == plain(current), f"{key}: docs/method.md §1.6 says {value}, config {current}"
    assert inspect.signature(pose_balance_repeats).parameters["bins"].default == 9


@pytest.mark.parametrize("number", ["2.1", "2.2"])
def test_criterion_constants(number):
    for key, (value, _where) in table_rows(doc_text(), number).items():
        cls, attr = key.split(".")
        actual = getattr(getattr(losses, cls)(), attr)
        decimals = len(value.partition(".")[2])
        within_rounding = pytest.approx(actual, abs=0.5 * 10 ** -decimals + 1e-12)
        assert float(value) == within_rounding, f"{key}: docs/method.md §{number} says {value}, code {actual}"


def test_soft_wing_defaults_are_shared():
    rows = table_rows(doc_text(), "2.1")
    expected = {k: float(rows[f"SoftWingLoss.{k}"][0]) for k in ("omega1", "omega2", "epsilon")}
    for fn in (losses.SoftWingLoss.__init__, relative_location_loss, relative_location_loss_reference,
               relative_location_loss_dense):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in expected} == expected, fn.__qualname__
    assert load_config("lgrn_r34_base", check_data=False).loss.params.model_dump() == expected


def test_scheme_tables():
    text = doc_text()
    graphs, flips, norms = table_rows(text, "1.2"), table_rows(text, "4.2"), table_rows(text, "5.1")
    assert set(graphs) == set(flips) == set(norms) == set(SCHEMES)
    for name, scheme in SCHEMES.items():
        graph, relations = message_graph(scheme), laplacian_relations(scheme)
        neighbours = graph.indptr.diff() - 1
        lonely = [i for i, row in enumerate(scheme.relation_neighbors) if not row]
        edges, entries, degree, count, without = graphs[name]
        assert (int(edges), int(entries)) == ((graph.num_edges - scheme.num_points) // 2, graph.num_edges), name
        assert int_list(degree) == list(range(int(neighbours.min()), int(neighbours.max()) + 1)), name
        assert (int(count), int_list(without)) == (relations.num_relations, lonely), name
        pairs, axis = flips[name]
        assert int(pairs) == sum(i < j for i, j in enumerate(scheme.flip)), name
        assert int_list(axis) == [i for i, j in enumerate(scheme.flip) if i == j], name
        groups = [[int_list(g.strip()) for g in cell.split("/")] for cell in norms[name]]
        assert groups == [[list(g) for g in scheme.ocular], [list(g) for g in scheme.pupils]], name


def test_metric_constants():
    rows = table_rows(doc_text(), "5.2")
    assert set(rows) == {"threshold", "HEAVY_OCCLUSION"}
    assert float(rows["HEAVY_OCCLUSION"][0]) == metrics.HEAVY_OCCLUSION
    threshold = float(rows["threshold"][0])
    for fn in (metrics.summarize, metrics.ced_curve, metrics.subset_table, metrics.occlusion_table,
               EvalResult.summary):
        assert inspect.signature(fn).parameters["threshold"].default == threshold, fn.__qualname__

"""The project's .proto files match the wire contract (shared/spec/wire.md) exactly.

wire.md lists, per package, the services, enums and messages that existing callers already speak.
This module turns those markdown tables into .proto files (same file paths as proto/, so buf
compares like with like) and checks the project's schema against them two ways:

* `buf breaking` with the WIRE_JSON rule set, in both directions, as wire.md suggests. One
  direction catches fields/values the project lost or changed, the other ones it added.
* A direct comparison of the two FileDescriptorSets (`buf build -o x.json`), because WIRE_JSON
  deliberately allows some changes that still break this contract: deleting a whole message,
  enum or RPC, adding RPCs or messages to a contract package, changing the file's imports.

A third test mutates a copy of the project's protos and asserts both checks notice, so a broken
check cannot pass silently.

None of these tests use the metald fixtures in conftest.py: no server, Docker or stubs needed.

Environment knobs:
  WIRE_SPEC  path to wire.md (default: <repo>/../shared/spec/wire.md, else the copy kept
             beside this file)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"

# wire.md names packages, not files. These are the project's file paths for each contract
# package; the generated tree uses the same ones because buf matches files by path.
PROTO_PATHS = {
    "metal.vmprovisioner.v1": "metal/vmprovisioner/v1/vmprovisioner.proto",
    "deploy.billaged.v1": "deploy/billaged/v1/billing.proto",
}

# buf config as inline data: no buf.yaml needs to exist in either tree.
BUF_BUILD_CONFIG = json.dumps({"version": "v2"})
BUF_WIRE_JSON_CONFIG = json.dumps({"version": "v2", "breaking": {"use": ["WIRE_JSON"]}})


# --------------------------------------------------------------------------------------------
# wire.md -> a small schema model
# --------------------------------------------------------------------------------------------


@dataclass
class Field:
    number: int
    name: str
    type: str  # as written in wire.md: "int64", "repeated VmState", "map<string,string>", ...


@dataclass
class Message:
    name: str
    fields: list[Field] = field(default_factory=list)


@dataclass
class Enum:
    name: str
    values: list[tuple[str, int]]


@dataclass
class Service:
    name: str  # short name; wire.md writes it fully qualified
    methods: list[tuple[str, str, str]] = field(default_factory=list)  # (name, request, response)


@dataclass
class Package:
    name: str
    imports: list[str] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    enums: list[Enum] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)


class WireSpecError(Exception):
    """wire.md has a shape this parser does not understand (fail rather than guess)."""


_PACKAGE_RE = re.compile(r"^###\s+package\s+`([A-Za-z_][\w.]*)`\s*$")
_IMPORTS_RE = re.compile(r"^imports:\s*(.*)$")
_SERVICE_RE = re.compile(r"^\*\*service\s+`([A-Za-z_][\w.]*)`\*\*")
_ENUM_RE = re.compile(r"^\*\*enum\s+`(\w+)`\*\*\s*:\s*(.+)$")
_ENUM_VALUE_RE = re.compile(r"`(\w+)`\s*=\s*(-?\d+)")
_MESSAGE_RE = re.compile(r"^\*\*message\s+`(\w+)`\*\*\s*$")
_BACKTICKED_RE = re.compile(r"`([^`]+)`")
_NAME = r"[A-Za-z_][\w.]*"
_TYPE_RE = re.compile(rf"^(?:repeated\s+{_NAME}|map<\s*{_NAME}\s*,\s*{_NAME}\s*>|{_NAME})$")

_SERVICE_HEADER = ["method", "request", "response"]
_MESSAGE_HEADER = ["#", "field", "type"]


def _cells(line: str) -> list[str]:
    return [c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")]


def parse_wire_md(text: str) -> list[Package]:
    """Parses wire.md's package sections. Anything table- or bold-shaped that is not understood
    raises WireSpecError, so a new construct in the spec cannot be skipped silently."""
    packages: list[Package] = []
    pkg: Package | None = None
    block: Service | Message | None = None  # the table the next `|` rows belong to
    header_seen = False
    table_rows = 0  # every non-header, non-separator row, to cross-check what was parsed

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"wire.md:{lineno}: {raw!r}"

        if line.startswith("#"):
            m = _PACKAGE_RE.match(line)
            pkg = Package(m.group(1)) if m else None  # any other heading ends the package
            if pkg:
                packages.append(pkg)
            block = None
            continue

        if line.startswith("|"):
            cells = _cells(line)
            if block is None or pkg is None:
                raise WireSpecError(f"table row outside a service/message block: {where}")
            if all(set(c) <= set("-: ") for c in cells):
                continue  # |---|---|---|
            if not header_seen:
                expected = _SERVICE_HEADER if isinstance(block, Service) else _MESSAGE_HEADER
                if cells != expected:
                    raise WireSpecError(f"expected header {expected}, got {cells}: {where}")
                header_seen = True
                continue
            if len(cells) != 3:
                raise WireSpecError(f"expected 3 cells: {where}")
            table_rows += 1
            if isinstance(block, Service):
                if not all(re.fullmatch(_NAME, c) for c in cells):
                    raise WireSpecError(f"bad method row: {where}")
                block.methods.append((cells[0], cells[1], cells[2]))
            else:
                number, name, typ = cells[0], cells[1], re.sub(r"\s+", " ", cells[2])
                if not (number.isdigit() and re.fullmatch(r"\w+", name) and _TYPE_RE.match(typ)):
                    raise WireSpecError(f"bad field row: {where}")
                block.fields.append(Field(int(number), name, typ))
            continue

        if not line:
            continue  # a blank line does not end a block: the table follows the bold title
        block = None  # any other text ends the current table

        if pkg is None:
            if line.startswith("**") or line.startswith("imports:"):
                raise WireSpecError(f"schema element outside a `### package` section: {where}")
            continue  # prose before the first package
        if m := _IMPORTS_RE.match(line):
            pkg.imports += _BACKTICKED_RE.findall(m.group(1))
        elif m := _SERVICE_RE.match(line):
            full = m.group(1)
            if not full.startswith(pkg.name + "."):
                raise WireSpecError(f"service not in package {pkg.name}: {where}")
            block = Service(full[len(pkg.name) + 1 :])
            pkg.services.append(block)
            header_seen = False
        elif m := _MESSAGE_RE.match(line):
            block = Message(m.group(1))
            pkg.messages.append(block)
            header_seen = False
        elif m := _ENUM_RE.match(line):
            values = [(n, int(v)) for n, v in _ENUM_VALUE_RE.findall(m.group(2))]
            leftover = _ENUM_VALUE_RE.sub("", m.group(2))
            if not values or leftover.strip(" ,"):
                raise WireSpecError(f"bad enum values {leftover.strip(' ,')!r}: {where}")
            pkg.enums.append(Enum(m.group(1), values))
        elif line.startswith("**"):
            raise WireSpecError(f"unknown schema element: {where}")

    parsed_rows = sum(len(s.methods) for p in packages for s in p.services) + sum(
        len(m.fields) for p in packages for m in p.messages
    )
    if parsed_rows != table_rows:  # belt and braces: every table row landed somewhere
        raise WireSpecError(f"parsed {parsed_rows} table rows, wire.md has {table_rows}")
    for p in packages:
        for m in p.messages:
            if not m.fields:
                raise WireSpecError(f"message {p.name}.{m.name} has no field table")
        for s in p.services:
            if not s.methods:
                raise WireSpecError(f"service {p.name}.{s.name} has no method table")
    return packages


def render_proto(pkg: Package) -> str:
    """One proto3 file for a package, types written exactly as wire.md spells them."""
    out = [
        "// Generated from shared/spec/wire.md by tests/interop/test_wire_contract.py.",
        'syntax = "proto3";',
        "",
        f"package {pkg.name};",
        "",
    ]
    out += [f'import "{imp}";' for imp in pkg.imports]
    for svc in pkg.services:
        out += ["", f"service {svc.name} {{"]
        out += [f"  rpc {m}({req}) returns ({resp});" for m, req, resp in svc.methods]
        out.append("}")
    for enum in pkg.enums:
        out += ["", f"enum {enum.name} {{"]
        out += [f"  {name} = {number};" for name, number in enum.values]
        out.append("}")
    for msg in pkg.messages:
        out += ["", f"message {msg.name} {{"]
        out += [f"  {f.type} {f.name} = {f.number};" for f in msg.fields]
        out.append("}")
    return "\n".join(out) + "\n"


def write_spec_tree(packages: list[Package], root: Path) -> Path:
    for pkg in packages:
        if pkg.name not in PROTO_PATHS:
            raise WireSpecError(
                f"wire.md defines package {pkg.name}, which has no file path in PROTO_PATHS; "
                "add the project's path for it there"
            )
        path = root / PROTO_PATHS[pkg.name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_proto(pkg))
    return root


# --------------------------------------------------------------------------------------------
# buf
# --------------------------------------------------------------------------------------------


def find_buf() -> str:
    """buf from the running venv (the pinned buf-bin), else from PATH."""
    candidate = Path(sys.executable).parent / "buf"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("buf")
    if not found:
        pytest.fail("buf not found: pip install -r tests/interop/requirements.txt (buf-bin)")
    return found


def _run_buf(buf: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # cwd = the input tree and input "." : with inline --config, buf treats the module as rooted
    # at the working directory, and refuses a sub-directory input of it (e.g. "proto" from the
    # repo root). --log-format text keeps colour codes out of assertion messages.
    return subprocess.run(
        [buf, *args, "--log-format", "text"],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def buf_breaking(buf: str, new: Path, old: Path) -> subprocess.CompletedProcess:
    """`buf breaking <new> --against <old>` with only the WIRE_JSON rule set."""
    return _run_buf(
        buf,
        ["breaking", ".", "--against", str(old.resolve()),
         "--config", BUF_WIRE_JSON_CONFIG, "--against-config", BUF_WIRE_JSON_CONFIG],
        cwd=new,
    )


def buf_descriptor_json(buf: str, tree: Path, out: Path) -> dict:
    """The tree's FileDescriptorSet as protojson (buf picks the format from the .json suffix)."""
    res = _run_buf(
        buf,
        ["build", ".", "--config", BUF_BUILD_CONFIG, "--as-file-descriptor-set",
         "--exclude-imports", "--exclude-source-info", "-o", str(out.resolve())],
        cwd=tree,
    )
    if res.returncode != 0:
        pytest.fail(f"buf build {tree} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------
# Descriptor comparison
# --------------------------------------------------------------------------------------------


def _field_line(f: dict) -> str:
    # Everything that reaches the wire or the JSON mapping: number, cardinality, type (with the
    # resolved type name, so enum vs message vs map entry is visible), JSON name, oneof/optional.
    parts = [f"#{f['number']}", f.get("label", "LABEL_OPTIONAL"), f["type"]]
    if f.get("typeName"):
        parts.append(f["typeName"])
    parts.append(f"json={f.get('jsonName', '')}")
    if f.get("proto3Optional"):
        parts.append("proto3_optional")
    if "oneofIndex" in f:
        parts.append(f"oneof={f['oneofIndex']}")
    return " ".join(parts)


def _walk_message(msg: dict, scope: str, out: dict[str, str]) -> None:
    full = f"{scope}.{msg['name']}"
    map_entry = bool(msg.get("options", {}).get("mapEntry"))
    oneofs = [o["name"] for o in msg.get("oneofDecl", [])]
    out[f"message {full}"] = f"map_entry={map_entry} oneofs={oneofs}"
    for f in msg.get("field", []):
        out[f"field {full}.{f['name']}"] = _field_line(f)
    for nested in msg.get("nestedType", []):  # map<k,v> fields become nested *Entry messages
        _walk_message(nested, full, out)
    for enum in msg.get("enumType", []):
        _walk_enum(enum, full, out)


def _walk_enum(enum: dict, scope: str, out: dict[str, str]) -> None:
    full = f"{scope}.{enum['name']}"
    out[f"enum {full}"] = "present"
    for v in enum.get("value", []):
        out[f"enum value {full}.{v['name']}"] = str(v.get("number", 0))


def schema_entries(fds: dict, packages: set[str]) -> dict[str, str]:
    """Flattens the files of the given packages to {"kind full.name": "wire-relevant facts"}.

    Files of other packages are left out: wire.md lets the project add its own packages.
    """
    out: dict[str, str] = {}
    for f in fds.get("file", []):
        pkg = f.get("package", "")
        if pkg not in packages:
            continue
        out[f"file {f['name']}"] = (
            f"package={pkg} syntax={f.get('syntax', 'proto2')} "
            f"imports={sorted(f.get('dependency', []))}"
        )
        scope = f".{pkg}"
        for msg in f.get("messageType", []):
            _walk_message(msg, scope, out)
        for enum in f.get("enumType", []):
            _walk_enum(enum, scope, out)
        for svc in f.get("service", []):
            svc_full = f"{scope}.{svc['name']}"
            out[f"service {svc_full}"] = "present"
            for m in svc.get("method", []):
                streaming = [s for s in ("clientStreaming", "serverStreaming") if m.get(s)]
                out[f"rpc {svc_full}.{m['name']}"] = (
                    f"{m['inputType']} -> {m['outputType']}"
                    + (f" {streaming}" if streaming else "")
                )
    return out


def schema_diff(spec: dict[str, str], project: dict[str, str]) -> list[str]:
    lines = []
    for key in sorted(spec.keys() | project.keys()):
        if key not in project:
            lines.append(f"missing in project: {key}  ({spec[key]})")
        elif key not in spec:
            lines.append(f"not in wire.md:     {key}  ({project[key]})")
        elif spec[key] != project[key]:
            lines.append(f"differs:            {key}\n    wire.md: {spec[key]}\n    project: {project[key]}")
    return lines


# --------------------------------------------------------------------------------------------
# The checks, as functions of a project tree (so the mutation test can aim them at a copy)
# --------------------------------------------------------------------------------------------


def breaking_failures(buf: str, project: Path, spec: Path) -> list[str]:
    """One message per direction in which `buf breaking` (WIRE_JSON) did not exit 0."""
    failures = []
    for label, new, old in (
        ("project vs wire.md (project lost or changed something)", project, spec),
        ("wire.md vs project (project added or changed something)", spec, project),
    ):
        res = buf_breaking(buf, new, old)
        if res.returncode != 0:
            failures.append(
                f"buf breaking {new} --against {old} [WIRE_JSON], {label}: "
                f"exit {res.returncode}\n{res.stdout}{res.stderr}"
            )
    return failures


def structural_diff(buf: str, project: Path, spec: Path, workdir: Path) -> list[str]:
    packages = set(PROTO_PATHS)
    spec_entries = schema_entries(buf_descriptor_json(buf, spec, workdir / "spec.json"), packages)
    project_entries = schema_entries(
        buf_descriptor_json(buf, project, workdir / "project.json"), packages
    )
    return schema_diff(spec_entries, project_entries)


# --------------------------------------------------------------------------------------------
# Fixtures and tests
# --------------------------------------------------------------------------------------------


# The shared spec, where it is checked out beside the clone; else the copy kept in the repo
# (tests/interop/wire.md), so a clone on its own still checks the contract. When both are
# there, test_the_kept_copy_is_the_spec makes sure they have not drifted apart.
SHARED_WIRE_SPEC = REPO_ROOT.parent / "shared" / "spec" / "wire.md"
KEPT_WIRE_SPEC = Path(__file__).with_name("wire.md")


def wire_spec_path() -> Path:
    if os.environ.get("WIRE_SPEC"):
        return Path(os.environ["WIRE_SPEC"])
    return SHARED_WIRE_SPEC if SHARED_WIRE_SPEC.is_file() else KEPT_WIRE_SPEC


@pytest.fixture(scope="module")
def wire_packages() -> list[Package]:
    spec_path = wire_spec_path()
    if not spec_path.is_file():
        pytest.fail(f"wire contract not found at {spec_path}")
    return parse_wire_md(spec_path.read_text())


def test_the_kept_copy_is_the_spec():
    if not SHARED_WIRE_SPEC.is_file():
        pytest.skip(f"no shared spec at {SHARED_WIRE_SPEC} to compare the kept copy with")
    assert KEPT_WIRE_SPEC.read_text() == SHARED_WIRE_SPEC.read_text(), (
        f"{KEPT_WIRE_SPEC} differs from {SHARED_WIRE_SPEC}: copy the spec again and update proto/"
    )


@pytest.fixture(scope="module")
def spec_tree(wire_packages, tmp_path_factory) -> Path:
    return write_spec_tree(wire_packages, tmp_path_factory.mktemp("wire_spec"))


@pytest.fixture(scope="module")
def buf() -> str:
    return find_buf()


def test_wire_md_covers_both_contract_packages(wire_packages):
    # Guards the parser: if wire.md's layout changed so that a package went unseen, the
    # comparisons below would quietly check less.
    found = {p.name: p for p in wire_packages}
    assert set(found) == set(PROTO_PATHS), f"wire.md packages: {sorted(found)}"
    for name, pkg in found.items():
        assert pkg.services and pkg.messages, f"{name}: nothing parsed from wire.md"


@pytest.mark.parametrize(
    "snippet",
    [
        "### package `a.v1`\n\n**oneof `X`**\n",  # a construct the parser does not know
        "### package `a.v1`\n\n**message `M`**\n\n| # | field | type |\n|---|---|---|\n| 1 | x | map<string> |\n",
        "### package `a.v1`\n\n**enum `E`**: `A`=0, B=1\n",  # unquoted value would be dropped
        "### package `a.v1`\n\n**message `M`**\n\nsome prose\n\n| # | field | type |\n| 1 | x | int32 |\n",
    ],
    ids=["unknown_element", "bad_type", "bad_enum_value", "orphan_table"],
)
def test_parser_rejects_what_it_does_not_understand(snippet):
    # The contract checks are only as good as the parse: wire.md shapes it cannot read must fail
    # loudly instead of shrinking the generated schema.
    with pytest.raises(WireSpecError):
        parse_wire_md(snippet)


def test_buf_breaking_wire_json_both_directions(buf, spec_tree):
    failures = breaking_failures(buf, PROTO_DIR, spec_tree)
    assert not failures, (
        f"proto/ does not match wire.md (generated schema: {spec_tree}):\n\n" + "\n\n".join(failures)
    )


def test_descriptors_equal_wire_md(buf, spec_tree, tmp_path):
    diff = structural_diff(buf, PROTO_DIR, spec_tree, tmp_path)
    assert not diff, (
        f"proto/ does not match wire.md (generated schema: {spec_tree}):\n" + "\n".join(diff)
    )


# Each mutation: (file, regex, replacement, expect `buf breaking` to catch it). Dropping an RPC is
# wire-compatible as far as WIRE_JSON is concerned, so only the structural check must see it.
MUTATIONS = {
    "renumbered_field": (
        PROTO_PATHS["metal.vmprovisioner.v1"], r"\bsockets\s*=\s*1\s*;", "sockets = 9;", True,
    ),
    "repeated_to_singular": (
        PROTO_PATHS["deploy.billaged.v1"], r"\brepeated\s+string\s+active_vms\b", "string active_vms", True,
    ),
    "int64_to_int32": (
        PROTO_PATHS["deploy.billaged.v1"], r"\bint64\s+stop_time\b", "int32 stop_time", True,
    ),
    "renamed_enum_value": (
        PROTO_PATHS["metal.vmprovisioner.v1"], r"\bVM_STATE_PAUSED\b", "VM_STATE_SUSPENDED", True,
    ),
    "dropped_rpc": (
        PROTO_PATHS["metal.vmprovisioner.v1"], r"\n\s*rpc\s+RebootVm\s*\([^;]*;", "", False,
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_checks_detect_a_mutated_copy(buf, spec_tree, tmp_path, mutation):
    """The checks can fail: a copy of proto/ with one contract change must be caught."""
    rel, pattern, replacement, buf_catches = MUTATIONS[mutation]
    copy = tmp_path / "proto"
    shutil.copytree(PROTO_DIR, copy)
    target = copy / rel
    text, count = re.subn(pattern, replacement, target.read_text())
    assert count == 1, f"mutation {mutation}: {pattern!r} matched {count} times in {rel}"
    target.write_text(text)

    diff = structural_diff(buf, copy, spec_tree, tmp_path)
    assert diff, f"structural check missed mutation {mutation}"
    if buf_catches:
        failures = breaking_failures(buf, copy, spec_tree)
        # Both directions see a changed (rather than added or removed) element.
        assert len(failures) == 2, f"buf breaking missed {mutation} in some direction: {failures}"

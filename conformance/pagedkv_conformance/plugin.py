"""The pytest plugin of the pagedkv conformance suite (``pytest11`` entry point).

Options choose what to check: ``--pagedkv-backend``, ``--pagedkv-device``,
``--pagedkv-dtype`` (repeatable or comma-separated). Check functions ask for
the ``target`` fixture (one backend on one device, ids like ``torch-cuda:0``)
and, where the dtype matters, ``dtype``. Targets that cannot run here stay in
the report as skips with the backend's own reason. Expected failures declared
in a backend's capabilities (``{check_prefix: reason}``) become strict
xfails, and declared entries that match no check are reported.

A run that verified nothing fails: an unknown backend, device or dtype is a
usage error before collection, and a session whose checks were all skipped
(or all expected failures) ends with a non-zero exit status and says why.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from pagedkv_core.errors import PagedKvError
from pagedkv_core.plugins import default_registry

from .targets import Target, check_request, discover_targets

pytest.register_assert_rewrite("pagedkv_conformance.helpers")

AREAS = ("capabilities", "allocator", "storage", "movement", "attention", "manager", "bad_input")
_TARGETS_KEY = pytest.StashKey[list]()
_UNMATCHED_KEY = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pagedkv", "pagedkv conformance")
    group.addoption("--pagedkv-backend", default=None, help="backend to check (default: every registered one)")
    group.addoption("--pagedkv-device", default=None, help="device to check (default: every device of the backend)")
    group.addoption("--pagedkv-dtype", action="append", default=[],
                    help="storage dtype(s) to check, repeatable or comma-separated (default: all the target supports)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pagedkv_area(name): the conformance area a check belongs to")
    config.addinivalue_line("markers", "slow: long sweeps of the conformance suite (pagedkv conformance --full)")
    try:
        check_request(default_registry(), config.getoption("pagedkv_backend"), config.getoption("pagedkv_device"),
                      requested_dtypes(config))
    except PagedKvError as exc:
        raise pytest.UsageError(f"pagedkv conformance: {exc}") from None
    config.pluginmanager.register(AreaSummary(config), "pagedkv-area-summary")


def targets(config: pytest.Config) -> list[Target]:
    if _TARGETS_KEY not in config.stash:
        config.stash[_TARGETS_KEY] = discover_targets(
            default_registry(), config.getoption("pagedkv_backend"), config.getoption("pagedkv_device"))
    return config.stash[_TARGETS_KEY]


def requested_dtypes(config: pytest.Config) -> list[str]:
    return [d.strip() for opt in config.getoption("pagedkv_dtype") for d in opt.split(",") if d.strip()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # only the suite's own checks (they carry an area marker): a project's own ``target`` fixture is left alone
    if "target" not in metafunc.fixturenames or metafunc.definition.get_closest_marker("pagedkv_area") is None:
        return
    wanted = requested_dtypes(metafunc.config)
    params = []
    for target in targets(metafunc.config):
        marks = [pytest.mark.skip(reason=f"{target.id}: {target.skip_reason}")] if target.skip_reason else []
        if "dtype" not in metafunc.fixturenames:
            params.append(pytest.param(target, id=target.id, marks=marks))
            continue
        caps = target.capabilities
        supported = [] if caps is None else list(caps.dtypes) + list(caps.quantized)
        for dtype in wanted or supported or ["float32"]:
            extra = list(marks)
            if caps is not None and not supported:  # the capabilities check fails this target
                extra.append(pytest.mark.skip(reason=f"{target.id} declares no storage dtype"))
            elif caps is not None and dtype not in supported:
                extra.append(pytest.mark.skip(reason=f"{target.id} does not support dtype {dtype}"))
            params.append(pytest.param(target, dtype, id=f"{target.id}-{dtype}", marks=extra))
    names = "target" if "dtype" not in metafunc.fixturenames else "target,dtype"
    metafunc.parametrize(names, params, scope="module")


def _area(item: pytest.Item) -> str:
    marker = item.get_closest_marker("pagedkv_area")
    return marker.args[0] if marker else "other"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Turn declared expected failures into strict xfails; remember which declarations matched."""
    matched: dict[tuple[str, str], bool] = {}
    for target in targets(config):
        if target.capabilities is None:
            continue
        for prefix in target.capabilities.expected_failures:
            matched.setdefault((target.id, prefix), False)
    for item in items:
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("target") if callspec else None
        if not isinstance(target, Target) or target.capabilities is None:
            continue
        check_id = f"{_area(item)}::{item.name}"
        for prefix, reason in target.capabilities.expected_failures.items():
            if check_id.startswith(prefix):
                item.add_marker(pytest.mark.xfail(reason=f"declared by {target.backend_name}: {reason}", strict=True))
                matched[(target.id, prefix)] = True
    config.stash[_UNMATCHED_KEY] = sorted(k for k, hit in matched.items() if not hit)


def pytest_itemcollected(item: pytest.Item) -> None:
    if item.get_closest_marker("pagedkv_area"):
        item.user_properties.append(("pagedkv_area", _area(item)))


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for target in targets(config):
        version = getattr(target.backend, "version", "?") if target.backend else "-"
        state = "ok" if not target.skip_reason else f"skipped: {target.skip_reason}"
        lines.append(f"pagedkv target {target.id} (backend version {version}): {state}")
    return lines


class AreaSummary:
    """Counts outcomes per area and prints the table ``pagedkv conformance`` ends with."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.skip_reasons: dict[str, Counter] = defaultdict(Counter)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        area = dict(report.user_properties).get("pagedkv_area")
        if area is None or not (report.when == "call" or (report.when == "setup" and not report.passed)):
            return
        if hasattr(report, "wasxfail"):
            self.counts[area]["xfailed" if report.skipped else "failed"] += 1
            return
        self.counts[area][report.outcome] += 1
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skip_reasons[area][reason.removeprefix("Skipped: ")] += 1

    @property
    def verified_nothing(self) -> bool:
        """Checks ran, and none of them passed: every one skipped or was an expected failure."""
        return bool(self.counts) and not any(c["passed"] for c in self.counts.values())

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.verified_nothing and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.counts:
            return
        tr = terminalreporter
        tr.section("pagedkv conformance summary")
        tr.write_line(f"{'area':<12} {'passed':>7} {'failed':>7} {'skipped':>8} {'xfailed':>8}")
        for area in [a for a in AREAS if a in self.counts] + sorted(set(self.counts) - set(AREAS)):
            c = self.counts[area]
            tr.write_line(f"{area:<12} {c['passed']:>7} {c['failed']:>7} {c['skipped']:>8} {c['xfailed']:>8}")
        for area, reasons in self.skip_reasons.items():
            for reason, count in reasons.most_common():
                tr.write_line(f"  skipped in {area} ({count}): {reason}")
        for target_id, prefix in self.config.stash.get(_UNMATCHED_KEY, []):
            tr.write_line(f"  declared expected failure of {target_id} matches no check: {prefix!r}")
        if self.verified_nothing:
            tr.write_line("pagedkv conformance verified nothing: every check was skipped or an expected failure "
                          "(reasons above); failing the run", red=True, bold=True)

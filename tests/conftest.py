"""Fixtures shared by the unit and end-to-end suites, and how the suite runs in parallel.

scripts/test.sh runs pytest on several processes (pytest-xdist, `--dist loadgroup`).
Tests that share something no two may use at once carry an `xdist_group` mark, and
one worker runs each group, a test at a time (docs/testing.md):

- "broker": every test that uses the private RabbitMQ node (the AMQP modules mark
  themselves; a test anywhere that asks for `admin` or `route` is added here), since
  some stop its app, freeze it or block its publishers;
- "default_ports": the two tests that listen on the default ports 5678, 5679, 9678.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import amqp_broker as broker
import hypothesis
import pytest
import structlog
import support.postgres as pg
from amqp_broker import Admin, Route
from support import summary

# Hypothesis fails an example slower than its deadline, 200 ms by default. An example
# of ~30 ms took 274 ms once, with the suite's other workers and more on both cores
# ("Unreliable test timings", FlakyFailure). 2 s still catches a runaway example.
hypothesis.settings.register_profile("kairoi", deadline=timedelta(seconds=2))
hypothesis.settings.load_profile("kairoi")

#: Fixtures that reach the private broker: a test using one is in the "broker" group.
BROKER_FIXTURES = frozenset({"admin", "route"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "xdist_group(name): tests of one group run on one xdist worker, one at a time"
    )
    # `-n N` alone means --dist load, which ignores the groups: the broker tests
    # would run side by side. The suite is only correct with loadgroup: the
    # controller schedules by group, and tells its workers to mark the groups
    # (they read --dist from the command line, see pytest_configure_node).
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and workerinput.get("kairoi_dist") == "loadgroup":
        config.option.loadgroup = True  # what an xdist worker sets for --dist loadgroup


@pytest.hookimpl(optionalhook=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Once per run, in the controller (or a run without xdist): the private broker
    node, if the run was given one, as an interrupted earlier run may have left it."""
    if getattr(session.config, "workerinput", None) is None:
        broker.reset_external_node()


@pytest.hookimpl(optionalhook=True)  # an xdist hook: `-p no:xdist` runs without it
def pytest_configure_node(node: Any) -> None:  # xdist's WorkerController, in the controller
    node.workerinput["kairoi_dist"] = node.config.option.dist


#: The longest tests outside the groups (function names, either store), longest
#: first: in parallel they start first, so that no worker is left alone with one of
#: them at the end while the others have finished (docs/testing.md, "Order"). Seconds
#: of a whole run at load ~8; only the order matters. A test missing here keeps its
#: place in the collection, after these.
SLOW_TESTS = {
    "test_the_most_attempts_with_no_backoff_end_failed_never_stuck_triggered": 66,
    "test_nothing_acknowledged_is_lost_and_cut_runs_run_again": 42,
    "test_job_and_rule_subcommands": 35,
    "test_postgres_down_then_back_loses_nothing_acknowledged": 28,
    "test_a_developers_cluster_on_5432_survives_reap_and_a_private_cluster": 20,
    "test_reap_stops_the_clusters_whose_owner_died_only": 19,
    "test_sigkill_right_after_a_run_loses_and_doubles_no_later_occurrence": 19,
    "test_json_documents": 18,
    "test_a_data_directory_a_running_server_holds_is_refused": 17,
    "test_batches_of_thousands_of_new_jobs_on_two_instances_at_once": 17,
    "test_a_watcher_that_stops_reading_is_dropped_and_memory_stays_bounded": 17,
    "test_the_server_survives_a_network_fuzz_and_keeps_what_it_acknowledged": 16,
    "test_500_watchers_share_each_change": 15,
    "test_a_pause_survives_a_restart_and_resume_runs_the_job_again": 14,
    "test_restart_keeps_committed_data": 13,
    "test_overlap_skip_and_buffer_one_with_a_script_slower_than_the_interval": 13,
    "test_a_flood_of_unmatched_jobs_is_logged_aggregated_and_counted_by_prefix": 13,
    "test_node_example": 11,
    "test_sigkill_during_a_run_the_next_occurrence_due_before_its_rerun_is_not_lost": 11,
    "test_atheris_finds_no_failing_input": 11,
    "test_imported_jobs_and_rules_are_served_and_a_triggered_job_runs_again": 11,
    "test_pause_survives_a_restart_and_resume_runs_again": 10,
    "test_pip_install_in_a_fresh_virtualenv": 10,
    "test_client_that_never_reads_does_not_grow_server_memory": 10,
    "test_a_job_running_on_one_instance_refuses_set_and_unset_on_every_other": 10,
    "test_v1_a_flipped_bit_in_any_byte_of_the_last_segments_is_refused": 10,
    "test_unusable_tls_files_are_named": 10,
    "test_a_job_set_on_one_instance_is_read_and_watched_on_another": 10,
    "test_watch_keeps_up_with_a_burst": 10,
    "test_misfire_policies_after_a_clean_stop_across_five_occurrences": 10,
    "test_text_output_keeps_one_line_per_job_whatever_the_id": 10,
    "test_jobs_due_while_down_run_at_start_oldest_first": 10,
    "test_stop_and_start_make_an_outage": 10,
}


def _slow_first(items: list[pytest.Item]) -> None:
    """The tests of SLOW_TESTS first, longest first (the PostgreSQL side of each
    before the log's, it is the slower); the others keep their order."""

    def seconds(item: pytest.Item) -> float:
        listed = SLOW_TESTS.get(getattr(item, "originalname", item.name), 0)
        return listed + 0.5 * ("postgres" in item.name) if listed else 0

    items.sort(key=lambda item: -seconds(item))  # stable: ties keep the collection order


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if getattr(config, "workerinput", None) is not None:  # an xdist worker: schedule by length
        _slow_first(items)
    for item in items:
        if BROKER_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())):
            continue
        groups = {mark.args[0] for mark in item.iter_markers("xdist_group")}
        if groups - {"broker"}:
            raise pytest.UsageError(f"{item.nodeid} uses the broker but is in groups {groups}")
        if not groups:
            item.add_marker(pytest.mark.xdist_group("broker"))


_GROUPS_IGNORED = pytest.StashKey[str]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """In a worker of --dist loadgroup, every grouped test's node id ends with
    "@<group>": that is how the controller learns the groups. Some pytest and xdist
    versions together leave it off (pytest-xdist issue 1386, pytest 9.2): the groups
    would be ignored without a word and the broker tests run side by side, so every
    test fails instead, saying why."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid.rsplit("]", 1)[-1]:
            session.config.stash[_GROUPS_IGNORED] = (
                f"pytest-xdist did not group {item.nodeid}: --dist loadgroup does not work "
                "with these pytest and pytest-xdist versions (see pyproject.toml); "
                "run with -n 0 meanwhile"
            )
            return


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _GROUPS_IGNORED in item.config.stash:
        pytest.fail(item.config.stash[_GROUPS_IGNORED], pytrace=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the report lines to the controller
        workeroutput["kairoi_summary"] = summary.export()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    summary.merge(getattr(node, "workeroutput", {}).get("kairoi_summary", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in summary.rendered():
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _fresh_logging_configuration() -> Iterator[None]:
    """A test that runs a command in-process (e.g. import-kairoi, which sets the
    level to warning) must not change what later tests' capture_logs sees."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session", autouse=True)
def _leave_the_default_broker_alone() -> Iterator[None]:
    """Whatever broker listens on the default port 5672 (a developer's own) is
    still listening and not frozen after the run: the tests use a private node
    (tests/amqp_broker.py) and must never stop, freeze or reconfigure another.
    Read from /proc only: the default broker is never even connected to."""
    before = broker.listener(broker.DEFAULT_PORT)
    yield
    try:
        if before is None:
            return
        after = broker.listener(broker.DEFAULT_PORT)
        assert after is not None, "the broker on 127.0.0.1:5672 stopped listening during the tests"
        assert before.frozen or not after.frozen, (
            f"the broker on 127.0.0.1:5672 (pid {after.pid}) was left frozen (SIGSTOP)"
        )
    finally:
        broker.stop_started_node()


@pytest.fixture
def admin() -> Iterator[Admin]:
    """A management connection to the suite's private RabbitMQ node (started if needed)."""
    broker.ensure_broker()
    admin = Admin()
    yield admin
    admin.close()


@pytest.fixture
def route(admin: Admin, request: pytest.FixtureRequest) -> Iterator[Route]:
    """A uniquely named exchange and bound queue, deleted afterwards."""
    route = broker.make_route(admin, request.module.__name__.rsplit("_", 1)[-1])
    yield route
    broker.remove_route(route)


@pytest.fixture(scope="session", autouse=True)
def _leave_the_default_postgres_alone() -> Iterator[None]:
    """Whatever listens on PostgreSQL's default port 5432 (a developer's own
    cluster) is the same process, still listening and not frozen, after the run:
    the tests use a private cluster (tests/support/postgres.py) and must never
    stop, restart or freeze another. Read from /proc only: never connected to."""
    before = broker.listener(pg.DEFAULT_PORT)
    yield
    try:
        if before is None:
            return
        after = broker.listener(pg.DEFAULT_PORT)
        assert after is not None, "the server on 127.0.0.1:5432 stopped listening during the tests"
        assert None in (before.pid, after.pid) or before.pid == after.pid, (
            f"the server on 127.0.0.1:5432 was restarted (pid {before.pid}, now {after.pid})"
        )
        assert before.frozen or not after.frozen, (
            f"the server on 127.0.0.1:5432 (pid {after.pid}) was left frozen (SIGSTOP)"
        )
    finally:
        pg.stop_started_cluster()


@pytest.fixture
def postgres_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database of its own on the suite's private PostgreSQL
    cluster (started if needed), as superuser; dropped after the test."""
    dsn = pg.fresh_database(request.node.name)
    yield dsn
    pg.drop_database(dsn)

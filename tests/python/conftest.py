"""Fixtures: a real amalgamd on a free loopback port, started for the session."""

import hashlib
import os
import pathlib
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The device the servers under test merge on: AMALGAM_TEST_DEVICE (a GPU
# machine sets "cuda"), by default the CPU; and the name it resolves to.
TEST_DEVICE = os.environ.get("AMALGAM_TEST_DEVICE", "cpu")
RESOLVED_DEVICE = "cuda:0" if TEST_DEVICE == "cuda" else TEST_DEVICE


# Tests that write catalog.db themselves run on the SQLite catalog only.
sqlite_only = pytest.mark.skipif(os.environ.get("AMALGAM_TEST_CATALOG") == "postgres",
                                 reason="edits the SQLite catalog.db directly")


def _catalog_flags(root):
    """With AMALGAM_TEST_CATALOG=postgres, a PostgreSQL database of ``root``'s
    own on the test server (AMALGAM_TEST_POSTGRES, its socket directory)."""
    if os.environ.get("AMALGAM_TEST_CATALOG") != "postgres":
        return []
    socket = os.environ["AMALGAM_TEST_POSTGRES"]
    name = "p_" + hashlib.sha256(str(root).encode()).hexdigest()[:16]
    # template0 takes no connections, so concurrent creations do not
    # collide; an existing database (a restart) is kept.
    subprocess.run(["psql", "-q", "-h", socket, "-U", "amalgam", "-d", "amalgam", "-c",
                    f"CREATE DATABASE {name} TEMPLATE template0"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return ["--catalog", f"postgresql://amalgam@/{name}?host={socket}"]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def pytest_runtest_setup(item):
    """Tests marked ``cuda`` skip without a CUDA device, and fail instead where
    AMALGAM_REQUIRE_CUDA=1 (a GPU machine, where a skip would hide a LibTorch
    without CUDA)."""
    if item.get_closest_marker("cuda") is None:
        return
    import torch
    if torch.cuda.is_available():
        return
    if os.environ.get("AMALGAM_REQUIRE_CUDA") == "1":
        pytest.fail("AMALGAM_REQUIRE_CUDA=1 but CUDA is not available")
    pytest.skip("CUDA not available")


def _binary(env, default):
    path = pathlib.Path(os.environ.get(env, ROOT / "build" / "bin" / default))
    if not path.exists():
        pytest.fail(f"{path} not found: build the project first (scripts/build.sh)")
    return str(path)


@pytest.fixture(scope="session")
def amalgamd_path():
    return _binary("AMALGAMD", "amalgamd")


@pytest.fixture(scope="session")
def cli_path():
    return _binary("AMALGAM_CLI", "amalgam")


def start_amalgamd(amalgamd_path, root, port=0, extra=(), attempts=1):
    """Starts amalgamd on 127.0.0.1:``port`` (0: a free one) with its data in
    ``root/data`` and ``extra`` flags; returns the process and its address
    once it serves. With ``attempts`` > 1 a start that exits (a port still
    held by a killed predecessor) is retried, 0.2 s apart."""
    for _ in range(attempts - 1):
        try:
            return start_amalgamd(amalgamd_path, root, port, extra)
        except pytest.fail.Exception:
            time.sleep(0.2)
    port_file = root / "port"
    if port_file.exists():
        port_file.unlink()
    log = open(root / "server.log", "ab")
    process = subprocess.Popen(
        [amalgamd_path, "--listen", f"127.0.0.1:{port}", "--data-dir", str(root / "data"),
         "--port-file", str(port_file), "--device", TEST_DEVICE, "--metrics-listen", "127.0.0.1:0",
         "--replica-name", root.name, *_catalog_flags(root), *extra],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"amalgamd did not start; see {root / 'server.log'}")
        time.sleep(0.02)
    return process, f"127.0.0.1:{port_file.read_text().split()[0]}"


def start_with_tokens(amalgamd_path, root, organisations=("org-a",), extra=()):
    """Starts amalgamd with a token file (mode 0600) giving organisation
    ``org-x`` the token ``tok-x``; returns the process, its address and the
    token file."""
    tokens = root / "tokens"
    tokens.write_text("".join(f"tok-{org[4:]} {org}\n" for org in organisations))
    os.chmod(tokens, 0o600)
    process, address = start_amalgamd(amalgamd_path, root,
                                      extra=("--tokens", str(tokens), *extra))
    return process, address, tokens


def metrics_port(root):
    """The metrics port of the amalgamd started in ``root``."""
    return int((root / "port").read_text().split()[1])


@pytest.fixture(scope="session")
def session_server(tmp_path_factory, amalgamd_path):
    """(address, root) of an amalgamd started for the session."""
    root = tmp_path_factory.mktemp("amalgamd")
    process, address = start_amalgamd(amalgamd_path, root)
    yield address, root
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def server(session_server):
    """Address of a running amalgamd with its own data directory."""
    return session_server[0]


@pytest.fixture
def client(server):
    import amalgam
    with amalgam.Client(server) as c:
        yield c

"""Apps in the enclave dial real hostnames (issue 15): per-entry loopback addresses and the hosts file.

An outbound entry's enclave_address puts its listener anywhere in 127.0.0.0/8 ("auto": an address
the hostname chooses), so two upstreams keep their real port; ``enclave --hosts-file`` maps each
entry's name to its address.  End to end, curl in the enclave's own network and mount namespaces
fetches https://payments.example.com/ and https://ledger.example.com/, both on port 443, from two
TLS servers with certificate verification on; it never names an address or a port.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import qproxy
from conftest import DEADLINE, ROOT, free_port, https_server, make_certificates, private_resolver, run_qproxy, wait_for

CURL = "/usr/bin/curl"
SERVERS = {"payments": "127.0.0.2", "ledger": "127.0.0.3"}  # where the host half's resolver puts each name

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "nsenter", "openssl"))
    or not os.access(CURL, os.X_OK),
    reason="needs root, unshare, nsenter, openssl and curl for an enclave with its own network and /etc/hosts",
)


def outbound(name: str, vsock_port: int, tcp_port: int = 443, address: str | None = None) -> str:
    text = f'[[outbound_connections]]\nhostname = "{name}"\nvsock_port = {vsock_port}\ntcp_port = {tcp_port}\n'
    return text + (f'enclave_address = "{address}"\n' if address else "")


def enclave_namespaces(folder, hosts: str) -> list[str]:
    """A wrapper giving the enclave half a network namespace and an /etc/hosts of its own (a bind
    mount, which a rename cannot replace: the half must rewrite it in place)."""
    (folder / "enclave-hosts").write_text(hosts)
    (folder / "enclave-nsswitch.conf").write_text("hosts: files\n")
    mounts = f'mount --bind "{folder}/enclave-hosts" /etc/hosts'
    if os.path.exists("/etc/nsswitch.conf"):
        mounts += f' && mount --bind "{folder}/enclave-nsswitch.conf" /etc/nsswitch.conf'
    return ["unshare", "-n", "-m", "sh", "-c", f'{mounts} && exec "$0" "$@"']


@pytest.fixture
def two_https_upstreams(tmp_path):
    """payments.example.com and ledger.example.com, each its own TLS server on port 443 with its own certificate."""
    make_certificates(tmp_path, {name: [f"{name}.example.com"] for name in SERVERS})
    servers = [https_server(tmp_path, name, f"{name} answered\n".encode(), address, 443)
               for name, address in SERVERS.items()]
    yield tmp_path / "ca.pem"
    for server in servers:
        server.stop()


@needs_namespaces
@pytest.mark.parametrize("addresses", [("auto", "auto"), ("127.0.10.1", "auto")], ids=["auto", "explicit-and-auto"])
def test_curl_in_the_enclave_reaches_two_https_services_on_443_by_name(proxy, two_https_upstreams, addresses):
    ca = two_https_upstreams
    proxy.write_config(outbound("payments.example.com", 8001, address=addresses[0])
                       + outbound("ledger.example.com", 8002, address=addresses[1]))
    own_lines = "127.0.0.1 localhost\n10.9.9.9 build.internal  # the image's own line\n"
    enclave = proxy.start("enclave", "--hosts-file", "/etc/hosts",
                          wrapper=enclave_namespaces(proxy.folder, own_lines))
    hosts = "".join(f"{address} {name}.example.com\n" for name, address in SERVERS.items())
    proxy.start("host", wrapper=private_resolver(proxy.folder, hosts))

    listening = {"payments.example.com": qproxy.loopback_for("payments.example.com") if addresses[0] == "auto"
                 else addresses[0], "ledger.example.com": qproxy.loopback_for("ledger.example.com")}
    written = (proxy.folder / "enclave-hosts").read_text()
    begin, end = qproxy.hosts_markers(str(proxy.config))
    assert written == own_lines + "".join(
        [begin + "\n"] + [f"{address} {name}\n" for name, address in listening.items()] + [end + "\n"])
    for name in SERVERS:
        result = subprocess.run(
            ["nsenter", f"--net=/proc/{enclave.process.pid}/ns/net", f"--mount=/proc/{enclave.process.pid}/ns/mnt",
             CURL, "--silent", "--show-error", "--max-time", str(DEADLINE), "--cacert", str(ca),
             f"https://{name}.example.com/"],
            capture_output=True, timeout=2 * DEADLINE)
        assert (result.returncode, result.stdout, result.stderr) == (0, f"{name} answered\n".encode(), b"")
    for vsock_port, address in zip((8001, 8002), listening.values()):
        enclave.wait_log(rf"conn \d+ opened: tcp [0-9.]+:\d+ -> tcp {re.escape(address)}:443 -> vsock 3:{vsock_port}")


# --- the hosts file, written by the enclave half -----------------------------------------------------


def config_of(text: str, tmp_path) -> qproxy.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return qproxy.load_config(str(path), qproxy.DEFAULT_CONTROL_PORT)


def test_the_hosts_lines_name_each_hostname_once_at_its_entrys_address_and_skip_ip_literals(tmp_path):
    config = config_of(outbound("A.example.com.", 8001, 443, "auto") + outbound("a.example.com", 8002, 80, "auto")
                       + outbound("b.example.com", 8003, 443, "127.0.0.9") + outbound("10.0.0.5", 8004, 5432)
                       + outbound("c.example.com", 8005, 8080), tmp_path)
    assert qproxy.hosts_lines(config) == [f"{qproxy.loopback_for('a.example.com')} a.example.com",
                                          "127.0.0.9 b.example.com", "127.0.0.1 c.example.com"]


MARKERS = qproxy.hosts_markers("/etc/qproxy.toml")


def write_hosts(path, lines: list[str], markers=MARKERS) -> str:
    qproxy.write_hosts_file(str(path), lines, markers)
    return path.read_text()


def block(*lines: str, markers=MARKERS) -> str:
    return "".join(f"{line}\n" for line in (markers[0], *lines, markers[1]))


def test_the_block_is_added_after_the_files_own_lines_and_replaced_at_the_next_start(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n# a comment\n")
    os.chmod(hosts, 0o640)
    first = write_hosts(hosts, ["127.1.1.1 a.example.com", "127.2.2.2 b.example.com"])
    assert first == "127.0.0.1 localhost\n::1 localhost ip6-localhost\n# a comment\n" + block(
        "127.1.1.1 a.example.com", "127.2.2.2 b.example.com")
    with hosts.open("a") as file:
        file.write("10.0.0.7 added.later\n")  # by someone else, after the block
    second = write_hosts(hosts, ["127.3.3.3 c.example.com"])
    assert second == ("127.0.0.1 localhost\n::1 localhost ip6-localhost\n# a comment\n10.0.0.7 added.later\n"
                      + block("127.3.3.3 c.example.com"))
    assert os.stat(hosts).st_mode & 0o777 == 0o640
    assert write_hosts(hosts, []) == ("127.0.0.1 localhost\n::1 localhost ip6-localhost\n# a comment\n"
                                      "10.0.0.7 added.later\n" + block())
    assert [path.name for path in tmp_path.iterdir()] == ["hosts"]  # no temporary file left behind


def test_a_missing_file_is_made(tmp_path):
    hosts = tmp_path / "hosts"
    assert write_hosts(hosts, ["127.1.1.1 a.example.com"]) == block("127.1.1.1 a.example.com")
    assert os.stat(hosts).st_mode & 0o777 == 0o644


def test_a_begin_line_without_an_end_line_stops_the_half_and_changes_nothing(tmp_path):
    hosts = tmp_path / "hosts"
    text = f"127.0.0.1 localhost\n{MARKERS[0]}\n127.9.9.9 old.example.com\n10.0.0.10 a line of the user's\n"
    hosts.write_text(text)
    with pytest.raises(qproxy.StartError, match=f"{hosts} .* has qproxy's begin line at line 2 but no end line"):
        qproxy.write_hosts_file(str(hosts), ["127.1.1.1 a.example.com"], MARKERS)
    assert hosts.read_text() == text


def test_every_copy_of_the_block_goes_and_markers_are_known_with_spaces_around(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"  {MARKERS[0]}\n127.9.9.9 old.example.com\n{MARKERS[1]}  \n10.0.0.1 user\n"
                     f"{MARKERS[0]}\n127.8.8.8 stale.example.com\n{MARKERS[1]}\n")
    assert write_hosts(hosts, ["127.1.1.1 a.example.com"]) == "10.0.0.1 user\n" + block("127.1.1.1 a.example.com")


def test_two_halves_with_files_of_their_own_keep_a_block_each(tmp_path):
    hosts = tmp_path / "hosts"
    other = qproxy.hosts_markers("/etc/other.toml")
    write_hosts(hosts, ["127.1.1.1 a.example.com"])
    write_hosts(hosts, ["127.2.2.2 b.example.com"], other)
    assert write_hosts(hosts, ["127.3.3.3 c.example.com"]) == (
        block("127.2.2.2 b.example.com", markers=other) + block("127.3.3.3 c.example.com"))


def test_halves_writing_at_once_lose_no_block(tmp_path):
    """Each holds the file's lock (flock) from its read to its write, and follows a file renamed over it."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    script = ("import sys, qproxy\nfor _ in range(20):\n"
              "    qproxy.write_hosts_file(sys.argv[1], [f'127.0.0.{sys.argv[2]} n{sys.argv[2]}.example'],"
              " qproxy.hosts_markers(f'/etc/{sys.argv[2]}.toml'))\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(hosts), str(number)], cwd=ROOT)
               for number in range(2, 8)]
    assert [writer.wait(timeout=2 * DEADLINE) for writer in writers] == [0] * 6
    text = hosts.read_text()
    assert text.startswith("127.0.0.1 localhost\n")
    for number in range(2, 8):
        assert text.count(block(f"127.0.0.{number} n{number}.example",
                                markers=qproxy.hosts_markers(f"/etc/{number}.toml"))) == 1, text


def test_the_files_own_lines_stay_byte_for_byte(tmp_path):
    hosts = tmp_path / "hosts"
    own = (b"127.0.0.1 localhost\r\n# a comment\x0c with a form feed" + "\u2028".encode()
           + b"\n10.0.0.1 caf\xe9 \xff\n# no final newline")
    hosts.write_bytes(own)
    qproxy.write_hosts_file(str(hosts), ["127.1.1.1 a.example.com"], MARKERS)
    assert hosts.read_bytes() == own + b"\n" + block("127.1.1.1 a.example.com").encode()


def test_a_symbolic_link_stays_one_and_its_target_is_written(tmp_path):
    target = tmp_path / "real-hosts"
    target.write_text("127.0.0.1 localhost\n")
    link = tmp_path / "hosts"
    link.symlink_to(target)
    qproxy.write_hosts_file(str(link), ["127.1.1.1 a.example.com"], MARKERS)
    assert link.is_symlink()
    assert target.read_text() == "127.0.0.1 localhost\n" + block("127.1.1.1 a.example.com")


def test_owner_mode_extended_attributes_and_hard_links_are_kept(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    os.chmod(hosts, 0o604)
    if os.geteuid() == 0:
        os.chown(hosts, 1000, 1001)
    try:
        os.setxattr(hosts, "user.qproxy-test", b"label")
    except OSError:
        pass  # a file system without user attributes: the rest is checked still
    attributes = {name: os.getxattr(hosts, name) for name in os.listxattr(hosts)}
    before = os.stat(hosts)
    write_hosts(hosts, ["127.1.1.1 a.example.com"])
    after = os.stat(hosts)
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert {name: os.getxattr(hosts, name) for name in os.listxattr(hosts)} == attributes
    link = tmp_path / "hosts.link"
    os.link(hosts, link)
    write_hosts(hosts, ["127.2.2.2 b.example.com"])
    assert link.read_text() == hosts.read_text() == "127.0.0.1 localhost\n" + block("127.2.2.2 b.example.com")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare to mount a tmpfs")
def test_a_full_disk_leaves_the_file_as_it_was(tmp_path):
    """Rewritten in place (a bind-mounted file), on a disk with no room for the new text: the
    room is taken first, and a failure changes nothing."""
    folder = tmp_path / "small"
    folder.mkdir()
    script = (
        "import os, sys, qproxy\n"
        "path = sys.argv[1] + '/hosts'\n"
        "open(path, 'w').write('127.0.0.1 localhost\\n' + '#' * 3000 + '\\n')\n"
        "open(sys.argv[1] + '/filler', 'wb').write(b'x' * 7000)\n"
        "os.chmod(sys.argv[1], 0o555)\n"  # no new file there: in place, as on a bind mount
        "try:\n"
        "    qproxy.write_hosts_file(path, ['127.1.1.1 a.example.com'] * 200, qproxy.hosts_markers(None))\n"
        "except qproxy.StartError as error:\n"
        "    print(error)\n"
        "print(open(path).read() == '127.0.0.1 localhost\\n' + '#' * 3000 + '\\n')\n"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size=12k none "{folder}" && exec "$0" "$@"',
                             sys.executable, "-c", script, str(folder)], capture_output=True, text=True, cwd=ROOT,
                            timeout=2 * DEADLINE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"cannot write the hosts file {folder}/hosts (--hosts-file): No space left on device", "True"]


def test_a_file_in_a_folder_that_cannot_take_a_new_file_is_rewritten_in_place(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into any folder: the in-place case is the bind-mounted /etc/hosts of the end-to-end test")
    folder = tmp_path / "etc"
    folder.mkdir()
    hosts = folder / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    os.chmod(folder, 0o555)
    try:
        assert write_hosts(hosts, ["127.1.1.1 a.example.com"]) == "127.0.0.1 localhost\n" + block(
            "127.1.1.1 a.example.com")
    finally:
        os.chmod(folder, 0o755)


def test_another_line_for_a_name_of_qproxys_is_warned_about(tmp_path, caplog):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.1.1.1 old A.example.com  # pinned once\n")
    with caplog.at_level("WARNING", logger="qproxy"):
        qproxy.write_hosts_file(str(hosts), ["127.1.1.1 a.example.com"], MARKERS)
    assert [record.getMessage() for record in caplog.records] == [
        f"{hosts} line 2 maps a.example.com too; a resolver may take that address, not qproxy's"]


def test_a_hosts_file_that_cannot_be_written_stops_the_enclave_half_at_start(proxy, tmp_path):
    proxy.write_config(outbound("a.example.com", 8001))
    result = run_qproxy("enclave", "--config", str(proxy.config), "--hosts-file", str(tmp_path / "no" / "hosts"),
                        env=proxy.env())
    assert result.returncode == qproxy.EXIT_CANNOT_START
    assert result.stderr.strip().splitlines()[-1] == (
        f"qproxy: error: cannot write the hosts file {tmp_path / 'no' / 'hosts'} (--hosts-file): No such file or"
        " directory")


def test_the_hosts_file_can_come_from_the_environment(proxy, tmp_path):
    hosts = tmp_path / "hosts"
    proxy.write_config(outbound("a.example.com", 8001, free_port(), "auto"))
    enclave = proxy.start("enclave", env={"QPROXY_HOSTS_FILE": str(hosts)})
    enclave.wait_log(rf"wrote 1 name\(s\) of outbound entries to {hosts}")
    assert hosts.read_text() == block(f"{qproxy.loopback_for('a.example.com')} a.example.com",
                                      markers=qproxy.hosts_markers(str(proxy.config)))


def test_an_empty_hosts_file_path_is_a_usage_error(proxy):
    proxy.write_config(outbound("a.example.com", 8001))
    result = run_qproxy("enclave", "--config", str(proxy.config), "--hosts-file", "", env=proxy.env())
    assert (result.returncode, result.stderr) == (
        qproxy.EXIT_USAGE, "qproxy: error: --hosts-file needs the path of a hosts file, such as /etc/hosts\n")


def test_a_lock_held_on_the_hosts_file_stops_the_enclave_half_within_the_bound(proxy, tmp_path):
    """Held by another process for longer than HOSTS_LOCK_TIMEOUT: exit 1 naming the file, and no
    listener left behind; the half never came to exist."""
    import fcntl

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    proxy.write_config(outbound("a.example.com", 8001, free_port()))
    with open(hosts, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_qproxy("enclave", "--config", str(proxy.config), "--hosts-file", str(hosts), env=proxy.env(),
                            timeout=qproxy.HOSTS_LOCK_TIMEOUT + DEADLINE)
    assert result.returncode == qproxy.EXIT_CANNOT_START
    assert result.stderr.strip().splitlines()[-1] == (
        f"qproxy: error: the hosts file {hosts} (--hosts-file) is locked by another process (flock) for"
        f" {qproxy.HOSTS_LOCK_TIMEOUT:g} s: fuser -v {hosts} names it")
    assert hosts.read_text() == "127.0.0.1 localhost\n"
    assert not (proxy.vsock_dir / "8001").exists()


def test_a_lock_released_within_the_bound_is_waited_for(proxy, tmp_path):
    import fcntl
    import threading

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    proxy.write_config(outbound("a.example.com", 8001, free_port()))
    held = open(hosts, "rb")
    fcntl.flock(held, fcntl.LOCK_EX)
    timer = threading.Timer(1.0, held.close)
    timer.start()
    try:
        enclave = proxy.start("enclave", "--hosts-file", str(hosts))
    finally:
        timer.cancel()
        held.close()
    enclave.wait_log(r"wrote 1 name\(s\)")
    assert hosts.read_text().startswith("127.0.0.1 localhost\n# qproxy enclave half: begin")

"""cryptlayer-runtime for a container that names an encrypted image (engine/encrypted.py,
docs/engines.md): the node's `[[keys]]`, the name derived from the engine's id, the config.json
rewrite (the image's default process where the placeholder's markers are), the variables that
named the image removed, and `delete` of such a container (a stand-in runtime; the assembly
itself needs dm-crypt: tests/vm/test_engines.py)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cryptlayer import config
from cryptlayer.distribution import placeholder
from cryptlayer.engine import encrypted
from cryptlayer.engine.cli import Invocation, container_name
from cryptlayer.errors import UsageError
from cryptlayer.image.manifest import ImageConfig
from cryptlayer.image.process import DEFAULT_PATH
from cryptlayer.keys.sources import Credential
from cryptlayer.runtime import state
from cryptlayer.runtime.state import Mode, Record

RUNTIME = str(Path(sys.executable).with_name("cryptlayer-runtime"))
DIGEST = "sha256:" + "ab" * 32
MATCHERS = "digest, image, repository and signer"
SOURCES = "identity, key-command, key-file and keyring"

# -- the node's keys


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(path))
    return path


def test_keys_first_match_wins(conf: Path, tmp_path: Path) -> None:
    (tmp_path / "srv/app-1").mkdir(parents=True)
    (tmp_path / "srv/other").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "srv/other")
    conf.write_text(f"""trust = "/etc/signers"
[[keys]]
image = "{tmp_path}/srv/app-*"
key-file = "/k/app.key"
[[keys]]
image = "{tmp_path}/srv/"
identity = "/k/never.pem"
[[keys]]
image = "{tmp_path}/srv/*"
identity = "/k/id.pem"
""")
    assert config.key_for(tmp_path / "srv/app-1") == config.ImageKey(
        f"{tmp_path}/srv/app-*", key_file="/k/app.key"
    )
    # matched by its real path: a symbolic link does not choose the key
    assert config.key_for(tmp_path / "link").identity == "/k/id.pem"
    with pytest.raises(UsageError) as err:
        config.key_for(tmp_path / "elsewhere")
    assert str(err.value) == (
        f"no key for the image {tmp_path}/elsewhere in {conf}: add an entry for it, e.g."
        f" {config.KEYS_EXAMPLE}"
    )
    assert not config.allow_unsigned()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys = 1", "keys is not a list of tables"),
        ('[[keys]]\nimage = "/a"\nkey-file = "/k"\nsigners = "x"',
         "[[keys]] entry 1: unknown setting signers (known: digest, image, repository, signer,"
         " identity, key-command, key-file, keyring)"),
        ('[[keys]]\nkey-file = "/k"', f"[[keys]] entry 1 must name exactly one of {MATCHERS}"
         " (the images it is for): e.g."),
        ('[[keys]]\nimage = "/a"\nsigner = "p@x"\nkey-file = "/k"',
         f"[[keys]] entry 1 must name exactly one of {MATCHERS} (the images it is for); it names 2"),
        ('[[keys]]\nimage = "/a"', f"[[keys]] entry 1 must name exactly one of {SOURCES} (its key):"),
        ('[[keys]]\nimage = "/a"\nkey-file = "/k"\nidentity = "/i"',
         f"[[keys]] entry 1 must name exactly one of {SOURCES} (its key); it names 2"),
        ('[[keys]]\nimage = "/a"\nkey-command = "cat /k"\nkeyring = "app"',
         f"[[keys]] entry 1 must name exactly one of {SOURCES} (its key); it names 2"),
        ('[[keys]]\nimage = "a/b"\nkey-file = "/k"', "[[keys]] entry 1: image is not an absolute path"),
        ('[[keys]]\nimage = "/a"\nkey-file = "k"', "[[keys]] entry 1: key-file is not an absolute path"),
        ('[[keys]]\nimage = "/a"\nkey-file = 3', "[[keys]] entry 1: key-file is not an absolute path"),
        ('[[keys]]\nimage = "/a"\nidentity = "id.pem"',
         "[[keys]] entry 1: identity is not an absolute path (or provider:NAME, tpm2:/FILE,"
         " pkcs11:URI)"),
        ('[[keys]]\nimage = "/a"\nidentity = "tpm2:node.ctx"',
         "[[keys]] entry 1: identity tpm2:node.ctx names no absolute path"),
        ('[[keys]]\nimage = "/a"\nkey-command = "vault \'unclosed"',
         "[[keys]] entry 1: key-command vault 'unclosed does not parse: No closing quotation"),
        ('[[keys]]\nimage = "/a"\nkey-command = "  "', "[[keys]] entry 1: key-command is empty"),
        ('[[keys]]\nimage = "/a"\nkeyring = ""', "[[keys]] entry 1: keyring is not a non-empty"),
        (f'[[keys]]\ndigest = "{DIGEST.upper()}"\nkey-file = "/k"',
         f"[[keys]] entry 1: digest {DIGEST.upper()} is not sha256:<64 lowercase hex digits>"),
        ('[[keys]]\ndigest = "sha256:abc"\nkey-file = "/k"', "[[keys]] entry 1: digest sha256:abc"),
        ('[[keys]]\nsigner = "*@example"\nkey-file = "/k"',
         "[[keys]] entry 1: signer *@example is not one principal"),
        ('[[keys]]\nsigner = "a@x,b@x"\nkey-file = "/k"', "[[keys]] entry 1: signer a@x,b@x is not"),
        ('[[keys]]\nrepository = "docker://reg.example/app"\nkey-file = "/k"',
         "[[keys]] entry 1: repository docker://reg.example/app is not a repository"),
        ('[[keys]]\nrepository = "reg.example/app:v1"\nkey-file = "/k"',
         "[[keys]] entry 1: repository reg.example/app:v1 is not a repository"),
        ('[[keys]]\nrepository = "app"\nkey-file = "/k"', "[[keys]] entry 1: repository app is not"),
        ('[[keys]]\nimage = "/a"\nkey-file = "/k"\n[[keys]]\nimage = "/b"',
         "[[keys]] entry 2 must name exactly one"),
        ('allow-unsigned = "yes"', "allow-unsigned is not true or false"),
    ],
)  # fmt: skip
def test_bad_keys_are_refused_by_every_command(conf: Path, text: str, message: str) -> None:
    conf.write_text(text)
    for read in (lambda: config.key_for(Path("/a")), config.quiet_warnings, config.oci_runtime):
        with pytest.raises(UsageError) as err:
            read()
        assert str(err.value).startswith(f"{conf}: {message}")


def test_keys_only_from_a_file_no_one_else_may_write(conf: Path) -> None:
    conf.write_text('[[keys]]\nimage = "/a"\nkey-file = "/k"\n')
    conf.chmod(0o666)
    with pytest.raises(UsageError) as err:
        config.key_for(Path("/a"))
    assert str(err.value) == (
        f"{conf} names keys, but it is not root's own file, writable by no one else (owner uid"
        f" 0, mode 0666): chown root {conf}; chmod go-w {conf}"
    )
    conf.chmod(0o644)
    assert config.key_for(Path("/a")).key_file == "/k"


def test_a_key_file_others_may_write_is_refused(conf: Path, tmp_path: Path) -> None:
    key = tmp_path / "app.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o622)
    conf.write_text(f'[[keys]]\nimage = "/a"\nkey-file = "{key}"\n')
    node = encrypted.credential_for(Path("/a"))  # chosen once the image is open and checked

    def choose() -> Credential:
        return node.choose(Path("/a"), signers=(), digest=DIGEST)

    with pytest.raises(UsageError, match="is not root's own file, writable by no one else"):
        choose()
    key.chmod(0o600)
    with choose() as credential:
        assert credential.key is not None
        with credential.key.view() as data:
            assert bytes(data) == b"k" * 32
    conf.write_text(f'[[keys]]\nimage = "/a"\nkey-file = "{tmp_path}/none"\n')
    with pytest.raises(UsageError, match=f"cannot read the key {tmp_path}/none that {conf}"):
        choose()


def test_signed_images_only_unless_the_node_says_otherwise(conf: Path) -> None:
    conf.write_text("")
    with pytest.raises(UsageError) as err:
        encrypted.trust()
    assert str(err.value) == (
        f"{conf} names no trust (allowed_signers) file, and cryptlayer-runtime runs signed"
        ' images only: set trust = "/etc/cryptlayer/allowed_signers" (or allow-unsigned = true)'
    )
    conf.write_text("allow-unsigned = true\n")
    assert encrypted.trust() is None
    conf.write_text('allow-unsigned = true\ntrust = "/etc/signers"\n')
    assert encrypted.trust() == Path("/etc/signers")  # trust, when named, always holds


# -- the request and the name


def oci(annotations: dict[str, str] | None = None, env: list[str] | None = None) -> dict[str, Any]:
    return {"process": {"env": env or ["PATH=/bin"]}, "annotations": annotations or {}}


def test_the_request() -> None:
    wanted = encrypted.request(oci({"org.cryptlayer.digest": DIGEST, "org.cryptlayer.keep":
                                    "true"}), "/srv/img")  # fmt: skip
    assert wanted == encrypted.Request(Path("/srv/img"), DIGEST, True)
    from_env = oci(env=["CRYPTLAYER_DIGEST=" + DIGEST, "CRYPTLAYER_KEEP=false"])
    assert encrypted.request(from_env, "/srv/img") == encrypted.Request(Path("/srv/img"), DIGEST)
    assert encrypted.request(oci(), "/srv/img") == encrypted.Request(Path("/srv/img"))


@pytest.mark.parametrize(
    ("spec", "image", "message"),
    [
        (oci(), "oci:/srv/img", "the image oci:/srv/img is neither an absolute path nor a docker"),
        (oci(), "srv/img", "the image srv/img is neither an absolute path nor a docker://"),
        (oci(), "docker://reg.example/App:v1", "docker://reg.example/App:v1: 'App' is not a"),
        (oci({"org.cryptlayer.keep": "yes"}), "/i", "org.cryptlayer.keep is 'yes': write true"),
        (oci({"org.cryptlayer.digest": "sha256:1"}), "/i", "--digest 'sha256:1' is not sha256:"),
        (oci({"org.cryptlayer.keep": "true"}, ["CRYPTLAYER_KEEP=false"]), "/i",
         "the annotation org.cryptlayer.keep and the environment variable CRYPTLAYER_KEEP differ"),
    ],
)  # fmt: skip
def test_bad_requests(spec: dict[str, Any], image: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        encrypted.request(spec, image)
    assert str(err.value).startswith(message)


def test_names_from_container_ids() -> None:
    assert container_name("c1") == "engine-c1"
    podman = "3f" * 32
    name = container_name(podman)
    assert len(name) == 63 and name.startswith(f"engine-{podman[:35]}-")
    assert state.check_name(name) == name
    # ids alike in their first characters are still told apart; so are short and long forms
    other = podman[:-1] + "0"
    assert container_name(other) != name and container_name(other)[:43] == name[:43]
    short = "a" * 55
    assert container_name(short) == f"engine-{short}"
    assert len(container_name("a" * 56)) == 63
    for odd in ("../../etc", "id with spaces", "\u00e9t\u00e9", "-x", "a" * 300):
        assert state.check_name(container_name(odd)) == container_name(odd)
    assert container_name("../x") != container_name("--/x")


@pytest.mark.parametrize(
    ("argv", "cid"),
    [
        (["create", "--bundle", "/b", "--pid-file", "/p", "--console-socket", "/s", "c1"], "c1"),
        (["--root", "/r", "create", "-b", "/b", "c1"], "c1"),
        (["create", "-db", "/b", "c1"], "c1"),
        (["create", "-b/b", "c1"], "c1"),
        (["create", "--bundle=/b", "--no-pivot", "c1"], "c1"),
        (["run", "--detach", "--bundle", "/b", "c1"], "c1"),
        (["delete", "--force", "c1"], "c1"),
        (["delete", "-f", "c1"], "c1"),
        (["delete", "c1"], "c1"),
        (["delete", "--", "c1"], "c1"),
        (["delete"], None),
        (["exec", "--process", "/p.json", "--detach", "--pid-file", "/x", "c1"], "c1"),
        (["exec", "-p", "/p.json", "c1"], "c1"),
        (["exec", "-dp", "/p.json", "c1"], "c1"),
        (["exec", "-p/p.json", "c1"], "c1"),
        (["exec", "--process=/p.json", "--tty", "c1"], "c1"),
        (["exec", "-process", "/p.json", "c1"], "c1"),  # Go's flag package
        (["exec", "--cwd", "/w", "-e", "A=1", "-u", "0", "c1", "sh"], "c1"),
    ],
)  # fmt: skip
def test_the_container_id(argv: list[str], cid: str | None) -> None:
    invocation = Invocation(argv)
    assert invocation.container_id() == cid
    assert invocation.globals() == argv[: argv.index(invocation.command or "")]
    expected = "/p.json" if any("p.json" in a for a in argv) else None
    assert invocation.process_file() == expected


# -- the config.json rewrite

IMAGE = ImageConfig(entrypoint=("/bin/app",), cmd=("--serve",), env=("PATH=/opt/bin", "A=image"),
                    workdir="/srv", user="app")  # fmt: skip
USERS = {"app": (1000, 1000), "0": (0, 0), "": (0, 0)}


def engine_spec(args: list[str] | None = None, **process: Any) -> dict[str, Any]:
    """What podman writes for `podman run [...] localhost/cryptlayer/placeholder:v1 [args]`."""
    caps = ["CAP_CHOWN", "CAP_KILL"]
    proc = {"terminal": False, "user": {"uid": 0, "gid": 0, "additionalGids": [0, 10]},
            "args": [placeholder.ENTRYPOINT, *(args or [])],
            "env": [f"PATH={placeholder.PATH}", "TERM=xterm", "container=podman",
                    "CRYPTLAYER_IMAGE=/srv/img", "HOSTNAME=abc"],
            "cwd": placeholder.WORKDIR,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                        {"type": "RLIMIT_CORE", "hard": -1, "soft": -1}]} | process  # fmt: skip
    return {"ociVersion": "1.0.2", "process": proc,
            "root": {"path": "/var/lib/containers/storage/overlay/x/merged", "readonly": True},
            "hostname": "abc",
            "mounts": [{"destination": "/data", "type": "bind", "source": "/host/data",
                        "options": ["rbind"]}],
            "annotations": {"org.cryptlayer.image": "/srv/img"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}],
                      "cgroupsPath": "machine.slice:libpod:abc", "seccomp": {"defaultAction":
                      "SCMP_ACT_ERRNO"}, "resources": {"memory": {"limit": 1 << 30}}}}  # fmt: skip


def rewritten(spec: dict[str, Any], image: ImageConfig = IMAGE) -> dict[str, Any]:
    before = copy.deepcopy(spec)
    new = encrypted.rewrite(spec, "/run/cryptlayer/c/rootfs", image, USERS.__getitem__)
    assert spec == before  # a new document: the engine's is not changed in place
    return new


def test_the_placeholder_process_becomes_the_images() -> None:
    spec = engine_spec()
    new = rewritten(spec)
    assert new["root"] == {"path": "/run/cryptlayer/c/rootfs", "readonly": True}
    for kept in ("mounts", "linux", "hostname", "annotations", "ociVersion"):
        assert new[kept] == spec[kept]
    process = new["process"]
    assert process["args"] == ["/bin/app", "--serve"]
    assert process["cwd"] == "/srv"
    # the image's environment under the engine's; the marker PATH is the image's; the variable
    # that named the image is gone
    assert process["env"] == ["PATH=/opt/bin", "A=image", "TERM=xterm", "container=podman",
                              "HOSTNAME=abc"]  # fmt: skip
    assert process["user"] == {"uid": 1000, "gid": 1000}
    assert process["capabilities"] == {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": [],
                                       "permitted": []}  # fmt: skip
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                                  {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]  # fmt: skip
    assert process["terminal"] is False


def test_what_the_user_gave_wins() -> None:
    # arguments after the image replace Cmd and keep the Entrypoint (docker run IMG a b)
    assert rewritten(engine_spec(["a", "b"]))["process"]["args"] == ["/bin/app", "a", "b"]
    # an entrypoint or a command of its own (podman run IMG cmd: --entrypoint, Kubernetes'
    # command) is run as it is; so are -w, -e PATH=, -e A= and -u
    given = engine_spec()
    given["process"].update(args=["/bin/sh", "-c", "echo hi"], cwd="/tmp",
                            env=["PATH=/mine", "A=given", "CRYPTLAYER_KEEP=true"],
                            user={"uid": 5, "gid": 6})  # fmt: skip
    process = rewritten(given)["process"]
    assert process["args"] == ["/bin/sh", "-c", "echo hi"]
    assert process["cwd"] == "/tmp"
    assert process["env"] == ["PATH=/mine", "A=given"]
    assert process["user"] == {"uid": 5, "gid": 6}
    assert process["capabilities"]["effective"] == ["CAP_CHOWN", "CAP_KILL"]


def test_an_image_without_defaults() -> None:
    bare = ImageConfig()
    process = rewritten(engine_spec(["/bin/true"]), bare)["process"]
    assert process["args"] == ["/bin/true"]
    assert process["cwd"] == "/"
    assert process["env"][0] == DEFAULT_PATH
    assert process["user"] == {"uid": 0, "gid": 0, "additionalGids": [0, 10]}  # root stays root
    with pytest.raises(UsageError, match="the image has no default command: give the engine"):
        rewritten(engine_spec(), bare)
    with pytest.raises(UsageError, match=r"process\.args is not a list of strings"):
        rewritten(engine_spec() | {"process": {"args": "sh"}})


def test_the_markers_are_the_placeholders() -> None:
    assert encrypted.is_placeholder_process({"args": [placeholder.ENTRYPOINT]})
    assert not encrypted.is_placeholder_process({"args": ["/bin/sh", placeholder.ENTRYPOINT]})
    assert not encrypted.is_placeholder_process({})


def test_the_naming_variables_are_removed() -> None:
    env = ["CRYPTLAYER_IMAGE=/i", "CRYPTLAYER_DIGEST=x", "CRYPTLAYER_KEEP=true", "A=1",
           "CRYPTLAYER_IMAGES=kept", "PATH=/bin"]  # fmt: skip
    assert encrypted.strip_env(env) == ["A=1", "CRYPTLAYER_IMAGES=kept", "PATH=/bin"]


def test_the_config_is_replaced_whole_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{}")
    path.chmod(0o640)
    encrypted.write_config(str(path), {"root": {"path": "/r"}})
    assert json.loads(path.read_text()) == {"root": {"path": "/r"}}
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# -- delete of a container that is cryptlayer's

STAND_IN = """#!/bin/sh
echo "$*" >> "$RECORD/calls"
case " $* " in
  *" delete "*) exit "$DELETE_STATUS" ;;
  *" state "*) exit "$STATE_STATUS" ;;
esac
exit 0
"""


@pytest.mark.parametrize(("delete", "state_status", "torn_down"),
                         [(0, 0, True), (1, 1, True), (1, 0, False)])  # fmt: skip
def test_delete_tears_down_after_the_runtime(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    delete: int,
    state_status: int,
    torn_down: bool,
) -> None:
    """The real runtime's delete first, its status passed on; then the record stopped. When
    the delete fails, only if the runtime no longer knows the container (a failed create), and
    then the container is deleted: status 0."""
    (tmp_path / "bin").mkdir()
    runc = tmp_path / "bin/runc"
    runc.write_text(STAND_IN)
    runc.chmod(0o755)
    (tmp_path / "config.toml").write_text('[runtime]\nruntime = "runc"\n')
    env = {"PATH": f"{tmp_path}/bin:/usr/bin:/bin", "RECORD": str(tmp_path),
           "CRYPTLAYER_CONFIG": str(tmp_path / "config.toml"),
           "CRYPTLAYER_ROOT": str(tmp_path / "state"), "CRYPTLAYER_RUNDIR": str(tmp_path / "run"),
           "DELETE_STATUS": str(delete), "STATE_STATUS": str(state_status)}  # fmt: skip
    cid = "9c" * 32
    monkeypatch.setenv("CRYPTLAYER_ROOT", env["CRYPTLAYER_ROOT"])
    monkeypatch.setenv("CRYPTLAYER_RUNDIR", env["CRYPTLAYER_RUNDIR"])
    with state.locked():
        record = state.create(Record(container_name(cid), str(tmp_path / "img"), False,
                                     Mode.START, 0))  # fmt: skip
    result = subprocess.run([RUNTIME, "--root", "/r", "delete", "--force", cid], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == (0 if torn_down else delete), result.stderr
    assert record.path.exists() is not torn_down
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"--root /r delete --force {cid}"] + (
        [f"--root /r state {cid}"] if delete else [])  # fmt: skip
    # another container's delete is the runtime's alone (by exec)
    (tmp_path / "calls").unlink()
    other = subprocess.run([RUNTIME, "delete", "c2"], env=env, capture_output=True)
    assert other.returncode == delete
    assert (tmp_path / "calls").read_text() == "delete c2\n"
    if not torn_down:
        record.path.unlink()


def test_checkpoint_of_an_encrypted_container_is_refused(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    (tmp_path / "state/containers").mkdir(parents=True)
    (tmp_path / "state/containers/engine-c1.json").write_text("{}")
    env = {"PATH": "/usr/bin:/bin", "CRYPTLAYER_ROOT": str(tmp_path / "state"),
           "CRYPTLAYER_CONFIG": str(tmp_path / "none.toml")}  # fmt: skip
    result = subprocess.run([RUNTIME, "checkpoint", "--image-path", "/x", "c1"], env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert (result.returncode, result.stderr) == (125, (
        "error: cryptlayer-runtime: the container c1 runs an encrypted image: a checkpoint would"
        " write its decrypted memory to disk\n"))  # fmt: skip


# -- podman 4.3 drives it: create, start, delete (the assembly stood in: no dm-crypt here)

# A stand-in for container.start and stop (and the image's statement): a plain copy of a busybox
# tree as the "assembled" root file system, under a real record. Everything else is the real
# runtime's path: the key from [[keys]], the rewrite, runc as a child, delete, the teardown.
STANDIN = """
import shutil
from pathlib import Path

from cryptlayer.image import manifest
from cryptlayer.image.manifest import ImageConfig, Manifest
from cryptlayer.runtime import container, state
from cryptlayer.runtime.state import Mode, Record

BASE = Path({base!r})


def start(image, credential, options):
    # the node's key, chosen as container.start chooses it once the image is open and checked
    credential = credential.choose(image, signers=(), digest="sha256:" + "0" * 64)
    with credential.key.view() as data:
        key = bytes(data).decode()
    with open(BASE / "log", "a") as log:
        print("start", options.name, image, key, options.shred, options.digest, options.trust,
              file=log)
    rootfs = BASE / "rootfs" / options.name
    shutil.copytree(BASE / "tree", rootfs, symlinks=True)
    with state.locked():
        return state.create(Record(options.name, str(image), options.shred, Mode.START, 0,
                                   rootfs=str(rootfs)))


def stop(name, force=False):
    with state.locked():
        state.remove(state.load(name))
    shutil.rmtree(BASE / "rootfs" / name)
    with open(BASE / "log", "a") as log:
        print("stop", name, file=log)


container.start, container.stop = start, stop
manifest.load = lambda image: Manifest((), ImageConfig(cmd=("/bin/busybox", "cat", "hello.txt"), env=("IMG=1",),
                                                        workdir="/data"))
"""

WRAPPER = """#!/bin/sh
export CRYPTLAYER_CONFIG={base}/config.toml CRYPTLAYER_ROOT={base}/state \\
    CRYPTLAYER_RUNDIR={base}/run PYTHONPATH={base}
exec {python} -c 'import sys, standin; from cryptlayer.engine.cli import main
sys.argv[0] = "cryptlayer-runtime"; main()' "$@"
"""

PODMAN_IMAGES = """set -u
export CONTAINERS_CONF={base}/containers.conf CONTAINERS_STORAGE_CONF={base}/storage.conf
{python} -m cryptlayer placeholder --engine podman > /dev/null || exit 99
run="podman run --rm --runtime {base}/cryptlayer-runtime --network none \\
     --ulimit nofile=1024:1024 --ulimit nproc=1024:1024"
$run --annotation org.cryptlayer.image=/srv/app localhost/cryptlayer/placeholder:v1
echo "status $?"
$run -e CRYPTLAYER_IMAGE=/srv/app -e CRYPTLAYER_KEEP=true localhost/cryptlayer/placeholder:v1 \\
    /bin/busybox sh -c 'echo "$IMG ${{CRYPTLAYER_IMAGE:-unset}} $(pwd)"; exit 5'
echo "status $?"
$run --annotation org.cryptlayer.image=/srv/app localhost/cryptlayer/placeholder:v1 nosuch
echo "status $?"
$run --annotation org.cryptlayer.image=/srv/other localhost/cryptlayer/placeholder:v1
echo "status $?"
podman run -d --name detached ${{run#podman run --rm}} \
    --annotation org.cryptlayer.image=/srv/app localhost/cryptlayer/placeholder:v1 \
    /bin/busybox sleep 600 > /dev/null
echo "run -d $?"
podman exec detached /bin/busybox sh -c 'cat hello.txt; echo "$IMG $(pwd)"'
echo "records $(ls {base}/state/containers | wc -l)"
podman stop --time 2 detached > /dev/null
echo "stop $?"
podman rm detached > /dev/null
echo "rm $?"
podman ps -a --format '{{{{.Names}}}}'
"""


def stand_in(base: Path) -> Path:
    """The stand-in assembly, the wrapper that runs cryptlayer-runtime with it, a busybox tree
    as the image's files, and the node's config (runc; the key of /srv/app); the wrapper."""
    shutil.copytree("/bin", base / "tree/bin", symlinks=False, ignore=lambda d, names: [
        n for n in names if n != "busybox"])  # fmt: skip
    (base / "tree/data").mkdir()
    (base / "tree/data/hello.txt").write_text("hello from the image\n")
    (base / "standin.py").write_text(STANDIN.format(base=str(base)))
    wrapper = base / "cryptlayer-runtime"
    wrapper.write_text(WRAPPER.format(base=base, python=sys.executable))
    wrapper.chmod(0o755)
    (base / "app.key").write_text("the-key")
    (base / "app.key").chmod(0o600)
    (base / "config.toml").write_text(f"""allow-unsigned = true
[runtime]
runtime = "runc"
[[keys]]
image = "/srv/app"
key-file = "{base}/app.key"
""")
    return wrapper


def test_podman_runs_an_image_through_the_runtime(tmp_path: Path) -> None:
    """podman (conmon, its create/start/delete) with the assembly stood in: the image's default
    process runs when podman was given none, a command given to podman wins, the variables
    that named the image are gone, the container's status comes back, and `--rm`'s delete
    tears the container down (kept or shredded as asked); `podman exec` into a detached one runs
    in the image's workdir with its environment, `stop` and `rm` end it; a create the real
    runtime fails (no such command: podman's 127) is torn down at once; an image without a key
    in the node's config fails, with our message shown by podman, and leaves nothing."""
    base = tmp_path
    stand_in(base)
    (base / "containers.conf").write_text(f"""[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base}/events.log"
tmp_dir = "{base}/libpod"
runtime_supports_json = ["crun", "runc", "cryptlayer-runtime"]
""")
    (base / "storage.conf").write_text(f"""[storage]
driver = "vfs"
graphroot = "{base}/storage"
runroot = "{base}/storage-run"
""")
    script = PODMAN_IMAGES.format(base=base, python=sys.executable)
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert result.stdout.splitlines() == [
        "hello from the image", "status 0", "1 unset /data", "status 5", "status 127",
        "status 126", "run -d 0", "hello from the image", "1 /data", "records 1", "stop 0", "rm 0",
    ], result.stderr  # fmt: skip
    refusal = (f"cryptlayer-runtime: no key for the image /srv/other in {base}/config.toml: add"
               f" an entry for it, e.g. {config.KEYS_EXAMPLE}")  # fmt: skip
    assert any(line.startswith("Error: OCI runtime error: ") and line.endswith(refusal)
               for line in result.stderr.splitlines()), result.stderr  # fmt: skip
    log = (base / "log").read_text().splitlines()
    assert [line.split()[0] for line in log] == ["start", "stop"] * 4
    first, _, second, *_ = (line.split() for line in log)
    assert first[2:] == ["/srv/app", "the-key", "True", "None", "None"]  # shredded
    assert second[2:] == ["/srv/app", "the-key", "False", "None", "None"]  # kept
    assert first[1].startswith("engine-") and len(first[1]) == 63
    assert not list((base / "state/containers").iterdir())
    assert not list((base / "rootfs").iterdir())


def test_run_by_hand_is_torn_down_when_it_ends(tmp_path: Path) -> None:
    """`cryptlayer-runtime run` in the foreground (not --detach): the container's output and
    status, then the teardown; with --detach it stays assembled until delete."""
    wrapper = stand_in(tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(terminal=False, args=[placeholder.ENTRYPOINT],
                           cwd=placeholder.WORKDIR)  # fmt: skip
    spec["annotations"] = {"org.cryptlayer.image": "/srv/app", "org.cryptlayer.keep": "true"}
    (bundle / "config.json").write_text(json.dumps(spec))
    state_dir = tmp_path / "runc-state"
    argv = [str(wrapper), "--root", str(state_dir), "run", "--bundle", str(bundle), "c1"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stdout) == (0, "hello from the image\n"), result.stderr
        log = (tmp_path / "log").read_text().splitlines()
        assert [line.split()[:2] for line in log] == [["start", "engine-c1"], ["stop", "engine-c1"]]
        assert not list((tmp_path / "state/containers").iterdir())
        rewritten = json.loads((bundle / "config.json").read_text())
        assert rewritten["root"]["path"] == f"{tmp_path}/rootfs/engine-c1"
        assert rewritten["process"]["args"] == ["/bin/busybox", "cat", "hello.txt"]
    finally:
        subprocess.run(["runc", "--root", str(state_dir), "delete", "--force", "c1"],
                       capture_output=True, check=False)  # fmt: skip


# -- containerd 1.6's CRI drives it, as the kubelet does (the assembly stood in)


def test_a_pod_through_containerds_cri(tmp_path: Path) -> None:
    """containerd with a `cryptlayer` handler (the runc shim running the runtime), driven over
    its CRI socket: the pod's sandbox, which gets the pod's annotation naming the image, passes
    through; a container from the placeholder with no command runs the image's default process;
    one with a command (Kubernetes' `command:`) runs it in the image's workdir and environment,
    its exit code comes back; each is assembled at create and torn down at its delete, which
    containerd calls when its process ends; the log file is the process's output; ExecSync
    (kubectl exec) into a running one runs in the image's workdir and environment."""
    import enginefixtures as ef

    base = tmp_path
    wrapper = stand_in(base)
    logs = base / "logs"
    logs.mkdir()
    with ef.containerd(base, base / "data", wrapper) as cri:
        ef.placeholder("containerd", cri.env | {"CRYPTLAYER_CONFIG": str(base / "config.toml")})
        api = cri.api
        pod = ef.pod_config(api, "job", logs, {"org.cryptlayer.image": "/srv/app"})
        sandbox = cri.runtime.RunPodSandbox(api.RunPodSandboxRequest(
            config=pod, runtime_handler=ef.HANDLER), timeout=ef.TIMEOUT).pod_sandbox_id  # fmt: skip
        try:
            assert not (base / "log").exists()  # the sandbox: passed through
            default = ef.container_config(api, "app", ef.PLACEHOLDER, [])
            assert ef.run_to_exit(cri, sandbox, pod, default) == (0, "hello from the image\n")
            script = 'echo "$IMG ${CRYPTLAYER_IMAGE:-unset} $(pwd)"; exit 5'
            given = ef.container_config(api, "job", ef.PLACEHOLDER,
                                        ["/bin/busybox", "sh", "-c", script])  # fmt: skip
            assert ef.run_to_exit(cri, sandbox, pod, given) == (5, "1 unset /data\n")
            # kubectl exec: the CRI's ExecSync into a running one, in the image's workdir
            sleeper = ef.container_config(api, "sleeper", ef.PLACEHOLDER,
                                          ["/bin/busybox", "sleep", "600"])  # fmt: skip
            cid = cri.runtime.CreateContainer(api.CreateContainerRequest(
                pod_sandbox_id=sandbox, config=sleeper, sandbox_config=pod),
                timeout=ef.TIMEOUT).container_id  # fmt: skip
            cri.runtime.StartContainer(api.StartContainerRequest(container_id=cid),
                                       timeout=ef.TIMEOUT)  # fmt: skip
            read = cri.runtime.ExecSync(api.ExecSyncRequest(
                container_id=cid, cmd=["/bin/busybox", "sh", "-c", "cat hello.txt; echo $IMG"],
                timeout=60), timeout=ef.TIMEOUT)  # fmt: skip
            assert (read.exit_code, read.stdout, read.stderr) == (
                0, b"hello from the image\n1\n", b"")  # fmt: skip
            cri.runtime.StopContainer(api.StopContainerRequest(container_id=cid, timeout=1),
                                      timeout=ef.TIMEOUT)  # fmt: skip
            cri.runtime.RemoveContainer(api.RemoveContainerRequest(container_id=cid),
                                        timeout=ef.TIMEOUT)  # fmt: skip
        finally:
            ef.remove_pod(cri, sandbox)
    log = [line.split()[:2] for line in (base / "log").read_text().splitlines()]
    assert [step for step, _ in log] == ["start", "stop"] * 3
    assert log[0][1].startswith("engine-") and len(log[0][1]) == 63  # the CRI's 64-digit id
    assert not list((base / "state/containers").iterdir())
    assert not list((base / "rootfs").iterdir())


def test_docker_through_the_runtime(tmp_path: Path) -> None:
    """Docker 20.10 (its own dockerd, the runtime in daemon.json), the image named by `-e
    CRYPTLAYER_IMAGE` (Docker sets no annotations): the image's default process, or the command
    given, without the variables that named the image; `docker run`'s status is the
    container's; `--rm` ends in the runtime's delete, which tears each down."""
    import enginefixtures as ef

    base = tmp_path
    wrapper = stand_in(base)
    with ef.dockerd(base, base / "data", base / "exec", wrapper) as docker:
        ef.placeholder("docker", docker.env | {"CRYPTLAYER_CONFIG": str(base / "config.toml")})
        run = ["run", "--rm", "--runtime", ef.HANDLER, "--network", "host", "--security-opt",
               "apparmor=unconfined", "-e", "CRYPTLAYER_IMAGE=/srv/app", ef.PLACEHOLDER]  # fmt: skip
        default = docker(*run)
        assert (default.returncode, default.stdout) == (0, "hello from the image\n"), (
            default.stderr)  # fmt: skip
        script = 'echo "$IMG ${CRYPTLAYER_IMAGE:-unset} $(pwd)"; exit 5'
        given = docker(*run, "/bin/busybox", "sh", "-c", script)
        assert (given.returncode, given.stdout) == (5, "1 unset /data\n"), given.stderr
    log = [line.split()[:2] for line in (base / "log").read_text().splitlines()]
    assert [step for step, _ in log] == ["start", "stop", "start", "stop"]
    assert not list((base / "state/containers").iterdir())
    assert not list((base / "rootfs").iterdir())


def test_a_teardown_longer_than_the_cris_deadline(tmp_path: Path) -> None:
    """containerd's CRI handles a container's exit under a 10 s deadline, and its shim then
    kills the runtime's `delete` (SIGKILL) and asks again later: a teardown that takes 15 s
    (an emulated VM's, a slow disk's shred) still ends, once, and the container is reported
    exited. Before, the kill ended the teardown halfway each time it was asked again: the record
    was left, and the image never shredded."""
    import enginefixtures as ef

    base = tmp_path
    wrapper = stand_in(base)
    standin = base / "standin.py"
    slow = "def stop(name, force=False):\n    import time\n    time.sleep(15)\n"
    standin.write_text(standin.read_text().replace("def stop(name, force=False):\n", slow))
    logs = base / "logs"
    logs.mkdir()
    with ef.containerd(base, base / "data", wrapper) as cri:
        ef.placeholder("containerd", cri.env | {"CRYPTLAYER_CONFIG": str(base / "config.toml")})
        api = cri.api
        pod = ef.pod_config(api, "job", logs, {"org.cryptlayer.image": "/srv/app"})
        sandbox = cri.runtime.RunPodSandbox(api.RunPodSandboxRequest(
            config=pod, runtime_handler=ef.HANDLER), timeout=ef.TIMEOUT).pod_sandbox_id  # fmt: skip
        try:
            default = ef.container_config(api, "app", ef.PLACEHOLDER, [])
            assert ef.run_to_exit(cri, sandbox, pod, default) == (0, "hello from the image\n")
        finally:
            ef.remove_pod(cri, sandbox)
        retried = [line for line in cri.log.read_text().splitlines()
                   if "failed to handle container TaskExit event" in line]  # fmt: skip
        assert retried  # (the deadline was met: else this proves nothing)
    log = [line.split()[0] for line in (base / "log").read_text().splitlines()]
    assert log == ["start", "stop"]
    assert not list((base / "state/containers").iterdir())

"""What needs no VM, on the host's real CPU: figure 8 (CLI start-up), and the parts of figures
2 and 4 that need no device-mapper (this host's kernel has none): the key check of `cryptsetup
open` and the erase of one layer, with the same cryptsetup calls cryptlayer makes. The cipher's
speed here puts figures 3 and 6, cipher-bound under emulation, in proportion."""

from __future__ import annotations

import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MiB, machine, record, sh, summary, timed

from cryptlayer.image import luksheader
from cryptlayer.image.files import open_dir, open_layer
from cryptlayer.image.shred import erase_layer
from cryptlayer.keys.sources import Secret
from cryptlayer.tools import cryptsetup

CLI = [sys.executable, "-m", "cryptlayer"]
RUNS = 15


def layer_without_mapping() -> dict[str, object]:
    """One layer's key check (`open --test-passphrase`) and erase (header copy, luksErase,
    luksDump check) on a LUKS2 file formatted as `build` formats layers."""
    with tempfile.TemporaryDirectory() as tmp:
        layer, copy = Path(tmp) / "layer0.luks", Path(tmp) / "layer0.hdr"
        key = Secret(bytearray(secrets.token_bytes(64)))

        def fresh() -> None:
            layer.unlink(missing_ok=True)
            copy.unlink(missing_ok=True)
            with open(layer, "wb") as f:
                f.truncate(64 * MiB)
            cryptsetup.format_luks(layer, key, label="bench")

        def erase() -> None:  # as at start: by descriptor, header copied first
            with open_dir(layer.parent) as files:
                opened = open_layer(files, layer.name, None)
                luksheader.backup(opened.path, copy)
                erase_layer(opened)

        fresh()
        out = {
            "cryptsetup_exec_only": summary(
                timed(lambda: sh("cryptsetup", "--version"), RUNS, cold=False)
            ),
            "key_check": summary(timed(lambda: cryptsetup.test_key(layer, key), RUNS, cold=False)),
            "erase": summary(timed(erase, RUNS, setup=fresh, cold=False)),
        }
        key.wipe()
    speed = sh("openssl", "speed", "-seconds", "1", "-bytes", "4096", "-evp", "aes-256-xts")
    match = re.search(r"AES-256-XTS\s+([\d.]+)k", speed)
    out["aes_256_xts_mib_s"] = float(match.group(1)) * 1000 / MiB if match else None
    return out


def registry_on_host(size_mib: int = 256, runs: int = 3) -> dict[str, object]:
    """Part 8: push and pull of a `size_mib` image against a local docker-registry, as processes,
    next to `skopeo copy` moving the same bytes (from and to an OCI layout) in the same run; and
    what pulling an image that is already there, or pushing one that is, costs. Every push goes
    to a fresh registry: a registry that has the blobs lets skopeo mount them instead."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    from luksfixtures import fake_image
    from registryfixtures import registry

    from cryptlayer.distribution import transfer

    out: dict[str, object] = {"size_mib": size_mib}
    copy = ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false"]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        base = Path(tmp)
        image = fake_image(base / "img", size=size_mib * MiB)
        sh(*CLI, "push", "-q", str(image), f"oci:{base}/layout:v1")
        n = iter(range(1000))

        def fresh(argv: list[str]) -> float:
            with registry(base / f"reg{next(n)}") as reg:
                target = [a.replace("HOST", reg.host) for a in argv]
                start = time.perf_counter()
                sh(*target)
                return time.perf_counter() - start

        push = [fresh([*CLI, "push", "-q", "--no-tls-verify", str(image), "HOST/b/app:v1"])
                for _ in range(runs)]  # fmt: skip
        skopeo_push = [fresh([*copy, f"oci:{base}/layout:v1", "docker://HOST/b/app:v1"])
                       for _ in range(runs)]  # fmt: skip
        with registry(base / "pull") as reg:
            host = reg.host
            sh(*CLI, "push", "-q", "--no-tls-verify", str(image), f"{host}/b/app:v1")
            dirs = iter(range(1000))
            pulls = timed(lambda: sh(*CLI, "pull", "-q", "--no-tls-verify", f"{host}/b/app:v1",
                                     str(base / f"pulled{next(dirs)}")),
                          runs, cold=False)  # fmt: skip
            skopeo_pulls = timed(lambda: sh(*copy, f"docker://{host}/b/app:v1",
                                            f"oci:{base}/out{next(dirs)}:v1"),
                                 runs, cold=False)  # fmt: skip
            there = base / "pulled0"
            process = timed(lambda: sh(*CLI, "pull", "-q", "--no-tls-verify",
                                       f"{host}/b/app:v1", str(there)),
                            runs, cold=False)  # fmt: skip
            in_process = timed(lambda: transfer.pull(
                transfer.open_store(f"{host}/b/app:v1", tls_verify=False), there),
                runs * 5, cold=False)  # fmt: skip
            repush = subprocess.run([*CLI, "push", "--no-tls-verify", str(image),
                                     f"{host}/b/app:v1"], check=True, capture_output=True,
                                    text=True).stderr  # fmt: skip
        bare = timed(lambda: sh(*CLI, "--help"), runs, cold=False)
    out.update(
        push=summary(push), skopeo_push=summary(skopeo_push), pull=summary(pulls),
        skopeo_pull=summary(skopeo_pulls), pull_already_there=summary(in_process),
        pull_already_there_process=summary(process), cli_help=summary(bare),
        repush_output=repush.strip(),
    )  # fmt: skip
    return out


def runtime_passthrough(runs: int = 50) -> dict[str, object]:
    """A passed-through `state` (issue 23's target: at most the runtime's own + 20 ms): the
    same call to crun and runc directly and through cryptlayer-runtime, interleaved, without and
    with a config file (which costs parsing it). crun against an id it does not know (crun
    cannot run a container on a host whose cgroup v2 hierarchy has controllers while v1 is
    mounted: "hybrid mode"); runc against a real container (busybox, created, not started)."""
    import json
    import os
    import shutil

    import cryptlayer

    engine = str(Path(sys.executable).with_name("cryptlayer-runtime"))
    # Byte-compiled, as an installed package is (pip compiles at install; an editable
    # install with PYTHONDONTWRITEBYTECODE set would compile engine/cli.py on every call).
    package = str(Path(cryptlayer.__file__).parent)
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "rootfs" / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", work / "rootfs/bin/busybox")
        subprocess.run(["runc", "spec"], cwd=work, check=True)
        spec = json.loads((work / "config.json").read_text())
        spec["process"].update(terminal=False, args=["/bin/busybox", "sleep", "600"])
        (work / "config.json").write_text(json.dumps(spec))
        state = str(work / "state")
        subprocess.run(["runc", "--root", state, "create", "--bundle", str(work), "bench"],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # fmt: skip
        crun_conf, runc_conf = work / "crun.toml", work / "runc.toml"
        crun_conf.write_text('[runtime]\nruntime = "crun"\n')
        runc_conf.write_text('[runtime]\nruntime = "runc"\n')
        calls = {
            "crun": (["crun", "state", "no-such-container"], None),
            "engine_crun_no_config": ([engine, "state", "no-such-container"], work / "absent"),
            "engine_crun_config": ([engine, "state", "no-such-container"], crun_conf),
            "runc": (["runc", "--root", state, "state", "bench"], None),
            "engine_runc_config": ([engine, "--root", state, "state", "bench"], runc_conf),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        try:
            for _ in range(runs):
                for name, (argv, conf) in calls.items():
                    # (the kept answer in the temporary directory: not the host's /run/cryptlayer,
                    # where answers for config files that are gone would stay until a reboot)
                    env = dict(os.environ, CRYPTLAYER_CONFIG=str(conf or work / "absent"),
                               CRYPTLAYER_RUNDIR=str(work / "run"))  # fmt: skip
                    start = time.perf_counter()
                    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
                    times[name].append(time.perf_counter() - start)
        finally:
            subprocess.run(["runc", "--root", state, "delete", "--force", "bench"], check=False)
    out: dict[str, object] = {name: summary(t) for name, t in times.items()}
    return out


def provider_unwrap(runs: int = 50) -> dict[str, object]:
    """Issue 24's target: unwrapping the image key through an ocicrypt `cmd` key provider adds at
    most 50 ms on the host CPU, the provider's own time excluded. The provider is a shell script
    that reads the request and prints a fixed answer; its own time is the same script run with
    the same request by a bare subprocess.run; cryptlayer's is envelope.unlock through it (the
    config read and checked, the request built, the exchange, the answer parsed and checked),
    interleaved with it, in-process (CLI start-up is cli_startup_host's figure)."""
    import base64
    import json
    import os

    from cryptlayer.image import envelope
    from cryptlayer.keys import providers
    from cryptlayer.keys.recipients import load_identity
    from cryptlayer.keys.sources import Credential

    image_key = envelope.new_image_key()
    with image_key.view() as data:
        optsdata = base64.b64encode(data).decode()
    check = envelope._provider_check(image_key)
    answer = json.dumps({"keyunwrapresults": {"optsdata": optsdata}})
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "provider"
        script.write_text(f"#!/bin/sh\ncat >/dev/null\nprintf '%s' '{answer}'\n")
        script.chmod(0o700)
        config = Path(tmp) / "ocicrypt_keyprovider.conf"
        config.write_text(json.dumps({"key-providers": {"bench": {"cmd": {"path": str(script)}}}}))
        config.chmod(0o600)
        os.environ[providers.ENV] = str(config)
        wrapped = base64.b64encode(b"opaque").decode()
        entry = envelope.Entry(
            envelope.EntryKind.PROVIDER, "provider:bench", wrapped, (("check", check),)
        )
        request = bytes(providers.unwrap_request("bench", providers.ENABLED, b"opaque"))

        def bare() -> None:
            subprocess.run([str(script)], input=request, capture_output=True, check=True)

        def through_cryptlayer() -> None:
            with Credential(identity=load_identity("provider:bench")) as credential:
                envelope.unlock(Path(tmp), [entry], credential).wipe()

        times: dict[str, list[float]] = {"provider_alone": [], "unlock_through_provider": []}
        for _ in range(runs):
            for name, fn in (("provider_alone", bare),
                             ("unlock_through_provider", through_cryptlayer)):  # fmt: skip
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    out: dict[str, object] = {name: summary(t) for name, t in times.items()}
    added = statistics.median(times["unlock_through_provider"]) - statistics.median(
        times["provider_alone"]
    )
    out["added_ms"] = round(added * 1000, 2)
    out["target_ms"] = 50
    return out


def ocicrypt_stream(size_mib: int = 128, runs: int = 5) -> dict[str, object]:
    """Issue 24's conversion target on the real CPU, where the VM's software AES does not swamp
    it: the reading side of a build (no device-mapper here), `oci:PLAIN` against the same image
    encrypted by skopeo (jwe:, RSA), interleaved, warm caches. Per side: the blob alone (the
    plain path's digest check against the decrypting stream: AES-256-CTR, HMAC-SHA256 and the
    digest), and a whole layer source as the build uses it, measure() (the blob check, then the
    tar scanned) and populate() (extracted by the confined child into a directory). Timed in CPU
    seconds (this process's and its children's, user and system): the host is shared, and wall
    times under load varied 2-4x from run to run; the disk waits are left out."""
    import shutil

    from sections.ocicrypt import plain_image

    from cryptlayer.build import oci, ocicrypt
    from cryptlayer.build.sources import OciLayerSource

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        content = plain_image(work / "plain", work / "trees", size_mib * MiB)
        private = work / "rsa.pem"
        sh("openssl", "genrsa", "-out", str(private), "2048")
        private.chmod(0o600)
        sh("openssl", "rsa", "-in", str(private), "-pubout", "-out", str(work / "rsa.pub"))
        sh("skopeo", "copy", "-q", "--encryption-key", f"jwe:{work / 'rsa.pub'}",
           f"oci:{work / 'plain'}:latest", f"oci:{work / 'enc'}:latest")  # fmt: skip
        keys = ocicrypt.load_keys([str(private)])
        target = work / "target"

        def populate(layers: tuple[oci.OciLayer, ...]) -> None:
            for layer in layers:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()
                OciLayerSource(layer).populate(target)

        steps = {
            "blob": lambda layers: [oci.verify_blob(x) for x in layers],
            "measure": lambda layers: [OciLayerSource(x).measure() for x in layers],
            "populate": populate,
        }
        times: dict[str, list[float]] = {}
        with (
            oci.open_image(f"oci:{work / 'plain'}:latest") as plain,
            oci.open_image(f"oci:{work / 'enc'}:latest", keys) as enc,
        ):
            blob_bytes = sum(x.size or 0 for x in enc.layers)
            for fn in steps.values():  # untimed: the blobs into the page cache
                fn(plain.layers)
                fn(enc.layers)
            for _ in range(runs):
                for step, fn in steps.items():
                    for side, image in (("plain", plain), ("encrypted", enc)):
                        start = _cpu_s()
                        fn(image.layers)
                        times.setdefault(f"{side}_{step}", []).append(_cpu_s() - start)
    out: dict[str, object] = {"content": content, "blob_bytes": blob_bytes, "clock": "cpu"}
    for name, t in times.items():
        out[name] = summary(t)
    median = {name: statistics.median(t) for name, t in times.items()}
    for side in ("plain", "encrypted"):
        median[f"{side}_build_reads"] = median[f"{side}_measure"] + median[f"{side}_populate"]
        out[f"{side}_build_reads_mib_s"] = content["bytes"] / MiB / median[f"{side}_build_reads"]
    out["ratio"] = median["plain_build_reads"] / median["encrypted_build_reads"]
    out["blob_mib_s"] = {side: blob_bytes / MiB / median[f"{side}_blob"]
                         for side in ("plain", "encrypted")}  # fmt: skip
    return out


def _cpu_s() -> float:
    import resource

    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))  # fmt: skip
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    if sys.argv[1:] == ["provider"]:
        record("provider_unwrap_host", provider_unwrap())
        return
    if sys.argv[1:] == ["registry"]:
        record("registry_on_host", registry_on_host())
        return
    if sys.argv[1:] == ["ocicrypt"]:
        record("ocicrypt_host", ocicrypt_stream())
        return
    if sys.argv[1:] == ["runtime"]:
        record("runtime_passthrough_host", runtime_passthrough())
        return
    record("machine_host", machine())
    figures = {
        "help": timed(lambda: sh(*CLI, "--help"), RUNS, cold=False),
        "ps": timed(lambda: sh(*CLI, "ps"), RUNS, cold=False),
        "bare_python": timed(lambda: sh(sys.executable, "-c", "pass"), RUNS, cold=False),
    }
    record("cli_startup_host", {name: summary(times) for name, times in figures.items()})
    record("layer_on_host", layer_without_mapping())
    record("registry_on_host", registry_on_host())
    record("runtime_passthrough_host", runtime_passthrough())
    record("provider_unwrap_host", provider_unwrap())
    record("ocicrypt_host", ocicrypt_stream())


if __name__ == "__main__":
    main()

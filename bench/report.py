"""docs/benchmarks/README.md (the table) and start-latency.png (the plot) from results.json."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS

MiB = 1 << 20


MiB_F = float(1 << 20)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


Row = tuple[str, str, str, str, str, str]


def rows(data: dict[str, Any]) -> list[Row]:
    """The table: each figure's rows, in the order of the report."""
    out: list[Row] = []
    out += _start_rows(data)
    out += _unlock_rows(data)
    out += _host_unlock_rows(data)
    out += _build_rows(data)
    out += _shred_rows(data)
    out += _host_erase_rows(data)
    out += _size_rows(data)
    out += _read_rows(data)
    out += _cipher_rows(data)
    out += _concurrent_rows(data)
    out += _verity_rows(data)
    if "process" in data:
        out += process_rows(data["process"])
    out += _registry_rows(data)
    out += _startup_rows(data)
    out += _engine_rows(data)
    out += _ocicrypt_rows(data)
    out += _lazy_rows(data)
    return out


def _sizes(data: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The start/size figures' runs, smallest tree first: (MiB, figures)."""
    return sorted((int(k.split("_")[1]), v) for k, v in data.items() if k.startswith("size_"))


def _start_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 1: start against decrypt+untar, joining an open image, as a process, and by size."""
    out: list[Row] = []
    sizes = _sizes(data)
    if sizes:
        small, big = sizes[0], sizes[-1]
        for size, fig in sizes:
            base = fig["baseline_decrypt_untar"]["median_s"]
            for layers, per in sorted(fig["layers"].items(), key=lambda kv: int(kv[0])):
                start = per["start"]["median_s"]
                target = ">= 10x faster at 1 GiB" if size >= 1024 else ""
                met = verdict(base / start >= 10) if size >= 1024 else ""
                out.append(
                    (
                        f"1. start, {size} MiB, {layers} layer(s)",
                        ms(start),
                        f"decrypt+untar {ms(base)}",
                        f"{base / start:.1f}x faster",
                        target,
                        met,
                    )
                )
            for layers, per in sorted(fig["layers"].items(), key=lambda kv: int(kv[0])):
                if "start_joining" in per:
                    join = per["start_joining"]["median_s"]
                    out.append(
                        (
                            f"1. start joining an open image, {size} MiB, {layers} layer(s)",
                            ms(join),
                            f"first start {ms(per['start']['median_s'])}",
                            f"{per['start']['median_s'] / join:.1f}x faster",
                            "",
                            "",
                        )
                    )
            proc = fig["layers"].get("1", {}).get("start_as_process")
            if proc:
                out.append(
                    (
                        f"1. start as a process, {size} MiB, 1 layer",
                        ms(proc["median_s"]),
                        "",
                        "CLI start-up taken out: "
                        + ms(fig["layers"]["1"]["start_as_process_minus_startup_s"]),
                        "",
                        "",
                    )
                )
        for layers in small[1]["layers"]:
            if layers in big[1]["layers"]:
                a = small[1]["layers"][layers]["start"]["median_s"]
                b = big[1]["layers"][layers]["start"]["median_s"]
                out.append(
                    (
                        f"1. start {big[0]} MiB vs {small[0]} MiB, {layers} layer(s)",
                        f"{b / a:.2f}x",
                        "",
                        "",
                        "<= 1.5x",
                        verdict(b / a <= 1.5),
                    )
                )
    return out


def _unlock_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 2: unlocking a layer, with a key file and with a passphrase."""
    out: list[Row] = []
    if "unlock" in data:
        u = data["unlock"]
        per_layer = u["cryptsetup_open_one_layer"]["median_s"]
        exec_only = u["cryptsetup_exec_only"]["median_s"]
        kf, pp = u["start_with_key_file"]["median_s"], u["start_with_passphrase"]["median_s"]
        cost = u["argon2id_cost"]
        out.append(
            (
                "2. unlock one layer (`cryptsetup open` with the image key)",
                ms(per_layer),
                f"`cryptsetup --version` {ms(exec_only)}",
                f"{ms(per_layer - exec_only)} beyond starting cryptsetup",
                "< 50 ms",
                verdict(per_layer < 0.05),
            )
        )
        out.append((f"2. start a {u['layers']}-layer image, key file", ms(kf), "", "", "", ""))
        out.append(
            (
                f"2. start a {u['layers']}-layer image, passphrase",
                ms(pp),
                f"key file {ms(kf)}",
                f"{pp / kf:.2f}x",
                f"one Argon2id ({cost['iterations']} it., {cost['memory_kib'] // 1024} MiB):"
                f" {ms(u['argon2id_unwrap']['median_s'])}",
                "",
            )
        )
    return out


def _host_unlock_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 2 on the host's real CPU: the key check."""
    out: list[Row] = []
    host = data.get("layer_on_host")
    if host:
        check, exec_only = host["key_check"]["median_s"], host["cryptsetup_exec_only"]["median_s"]
        out.append(
            (
                "2. on the host's real CPU: check one layer's key (`cryptsetup open"
                " --test-passphrase`: all of an unlock but the mapping)",
                ms(check),
                f"`cryptsetup --version` {ms(exec_only)}",
                "",
                "< 50 ms",
                "met for the key check; the mapping cannot be measured here",
            )
        )
    return out


def _build_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 3: build throughput against dd through dm-crypt."""
    out: list[Row] = []
    sizes = _sizes(data)
    if "dm_crypt_limit" in data and sizes:
        limit = data["dm_crypt_limit"]["dd_through_mapping_mib_s"]
        for size, fig in sizes:
            if "1" in fig["layers"]:
                rate = fig["layers"]["1"]["build_mib_s"]
                plain = fig["layers"]["1"].get("plain_copy_mib_s")
                out.append(
                    (
                        f"3. build throughput, {size} MiB, 1 layer",
                        f"{rate:.1f} MiB/s",
                        f"dd through dm-crypt {limit:.1f} MiB/s"
                        + (f"; the same copy to plain ext4 {plain:.1f} MiB/s" if plain else ""),
                        f"{rate / limit:.0%}"
                        + (f" ({rate / plain:.0%} of the copy)" if plain else ""),
                        ">= 50%",
                        verdict(rate / limit >= 0.5),
                    )
                )
    return out


def _shred_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 4: stop and shred against rm -rf and shred."""
    out: list[Row] = []
    sizes = _sizes(data)
    for size, fig in sizes:
        for layers, per in sorted(fig["layers"].items(), key=lambda kv: int(kv[0])):
            t = per["stop_and_shred"]["median_s"]
            out.append(
                (
                    f"4. stop and shred, {size} MiB, {layers} layer(s)",
                    f"{ms(t)} ({ms(t / int(layers))}/layer)",
                    f"rm -rf {ms(fig['baseline_rm_rf']['median_s'])},"
                    f" shred -n {fig.get('baseline_shred_passes', 3)}"
                    f" {ms(fig['baseline_shred']['median_s'])}"
                    + (
                        " (scaled from an earlier one-pass rate)"
                        if fig["baseline_shred"].get("extrapolated")
                        else ""
                    ),
                    f"{fig['baseline_shred']['median_s'] / t:.0f}x faster than shred",
                    "< 100 ms/layer",
                    verdict(t / int(layers) < 0.1),
                )
            )
    return out


def _host_erase_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 4 on the host's real CPU: the erase."""
    out: list[Row] = []
    host = data.get("layer_on_host")
    if host:
        erase = host["erase"]["median_s"]
        out.append(
            (
                "4. on the host's real CPU: erase one layer (header copy, `luksErase`, check)",
                ms(erase),
                "",
                "",
                "< 100 ms/layer",
                "met for the erase; the teardown cannot be measured here",
            )
        )
    return out


def _size_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 5: image size against the tar of the same tree."""
    out: list[Row] = []
    sizes = _sizes(data)
    for size, fig in sizes:
        for layers, per in sorted(fig["layers"].items(), key=lambda kv: int(kv[0])):
            limit = 1.1 * fig["tar_bytes"] + int(layers) * MiB
            out.append(
                (
                    f"5. image size, {size} MiB, {layers} layer(s)",
                    f"{per['image_bytes'] / MiB:.1f} MiB",
                    f"tar {fig['tar_bytes'] / MiB:.1f} MiB",
                    f"{per['image_bytes'] / fig['tar_bytes']:.3f}x",
                    "<= 1.1x + 1 MiB/layer",
                    verdict(per["image_bytes"] <= limit),
                )
            )
    return out


def _read_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 6: reading through cryptlayer against plain ext4."""
    out: list[Row] = []
    if "read" in data:
        r = data["read"]
        for kind in ("sequential_s", "small_files_s"):
            plain = r["plain_ext4"][kind]
            for variant in ("cryptlayer", "cryptlayer_no_workqueue"):
                got = r[variant][kind]
                label = kind.removesuffix("_s").replace("_", " ")
                name = "" if variant == "cryptlayer" else " (no dm-crypt workqueues)"
                out.append(
                    (
                        f"6. read, {label}{name}, {r['size_mib']} MiB",
                        ms(got),
                        f"plain ext4 {ms(plain)}",
                        f"{plain / got:.0%} of plain",
                        ">= 80%",
                        verdict(plain / got >= 0.8),
                    )
                )
    return out


def _cipher_rows(data: dict[str, Any]) -> list[Row]:
    """Figures 3 and 6: the cipher on the host's real CPU against the emulated VM."""
    out: list[Row] = []
    host = data.get("layer_on_host")
    if host and host.get("aes_256_xts_mib_s") and "dm_crypt_limit" in data:
        vm = data["dm_crypt_limit"].get("cryptsetup_benchmark_decrypt_mib_s")
        out.append(
            (
                "3, 6. the cipher (AES-256-XTS) on the host's real CPU (`openssl speed`)",
                f"{host['aes_256_xts_mib_s']:.0f} MiB/s",
                f"emulated VM (`cryptsetup benchmark`, decrypt) {vm:.0f} MiB/s" if vm else "",
                f"{host['aes_256_xts_mib_s'] / vm:.0f}x" if vm else "",
                "",
                "",
            )
        )
    return out


def _concurrent_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 7: concurrent starts."""
    out: list[Row] = []
    if "concurrent" in data:
        c = data["concurrent"]
        out.append(
            (
                f"7. {c['containers']} concurrent starts (processes)",
                ms(c["total_s"]),
                "",
                f"peak memory {c['peak_memory_mib']:.0f} MiB",
                "",
                "failures: " + str(len(c["failures"])),
            )
        )
    return out


def _verity_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 10: dm-verity: open, read, build and the tree size."""
    out: list[Row] = []
    if "verity" in data:
        v = data["verity"]
        plain, checked = v["plain_luks"], v["verity"]
        delta = checked["open"]["median_s"] - plain["open"]["median_s"]
        out.append(
            (
                f"10. open one layer with dm-verity, {v['size_mib']} MiB",
                ms(checked["open"]["median_s"]),
                f"without {ms(plain['open']['median_s'])}",
                f"+{ms(delta)} ({delta / plain['open']['median_s']:.0%})",
                "<= +10% per layer",
                verdict(delta <= 0.1 * plain["open"]["median_s"]),
            )
        )
        for kind, label in (("sequential_s", "sequential"), ("small_files_s", "small files")):
            ratio = plain[kind] / checked[kind]
            out.append(
                (
                    f"10. read through dm-verity, {label}, {v['size_mib']} MiB",
                    ms(checked[kind]),
                    f"without {ms(plain[kind])}",
                    f"{ratio:.0%} of it",
                    ">= 90%",
                    verdict(ratio >= 0.9),
                )
            )
        share = v["tree_format"]["median_s"] / (v["build_s"] - v["tree_format"]["median_s"])
        out.append(
            (
                f"10. build, the hash tree's share, {v['size_mib']} MiB",
                ms(v["build_s"]),
                f"veritysetup format {ms(v['tree_format']['median_s'])}",
                f"+{share:.0%}",
                "<= +15%",
                verdict(share <= 0.15),
            )
        )
        limit = v["layer_bytes"] * 0.01 + 8192
        out.append(
            (
                f"10. hash tree size, {v['size_mib']} MiB layer",
                f"{v['tree_bytes'] / 1024:.0f} KiB",
                f"layer {v['layer_bytes'] / MiB_F:.0f} MiB",
                f"{v['tree_bytes'] / v['layer_bytes']:.2%}",
                "<= 1% + 8 KiB",
                verdict(v["tree_bytes"] <= limit),
            )
        )
    return out


def _registry_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 9: push and pull against skopeo on the host."""
    out: list[Row] = []
    if "registry_on_host" in data:
        r = data["registry_on_host"]
        size = r["size_mib"]
        for what in ("push", "pull"):
            ours, theirs = r[what]["median_s"], r[f"skopeo_{what}"]["median_s"]
            out.append(
                (
                    f"9. {what} of {size} MiB, as a process, local registry",
                    ms(ours),
                    f"skopeo copy of the same bytes {ms(theirs)}",
                    f"{size / ours:.0f} MiB/s, {theirs / ours:.0%} of skopeo's rate",
                    ">= 80%",
                    verdict(theirs / ours >= 0.8),
                )
            )
        there = r["pull_already_there"]["median_s"]
        process, bare = r["pull_already_there_process"]["median_s"], r["cli_help"]["median_s"]
        out.append(
            (
                "9. pull of an image already there (one manifest request; in-process)",
                ms(there),
                f"as a process {ms(process)}, `cryptlayer --help` {ms(bare)}",
                "",
                "< 100 ms",
                verdict(there < 0.1),
            )
        )
        out.append(
            (
                "9. push of an image the registry has",
                (re.findall(r"\((\d+ blob\(s\) sent)\)", r["repush_output"]) or ["?"])[0],
                "",
                "",
                "uploads nothing",
                verdict("(0 blob(s) sent)" in r["repush_output"]),
            )
        )
    return out


def _startup_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 8: the CLI's start-up on the host."""
    out: list[Row] = []
    if "cli_startup_host" in data:
        h = data["cli_startup_host"]
        bare = h["bare_python"]["median_s"]
        for cmd in ("help", "ps"):
            t = h[cmd]["median_s"]
            out.append(
                (
                    f"8. `cryptlayer {'--help' if cmd == 'help' else 'ps'}` on the host",
                    ms(t),
                    f"bare python {ms(bare)}",
                    f"{t / bare:.1f}x",
                    "< 150 ms",
                    verdict(t < 0.15),
                )
            )
    return out


def _engine_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 12: cryptlayer-runtime under an engine: a passed-through `state` on the host, and
    `podman run` through it against `cryptlayer run` of the same image in the VM."""
    out: list[Row] = []
    passthrough = data.get("runtime_passthrough_host", {})
    for own, through in (("crun", "engine_crun_config"), ("runc", "engine_runc_config")):
        if own in passthrough and through in passthrough:
            direct, engine = passthrough[own]["median_s"], passthrough[through]["median_s"]
            out.append((f"12. on the host's real CPU: a passed-through `{own} state`",
                        ms(engine), f"`{own} state` itself {ms(direct)}",
                        f"+{(engine - direct) * 1000:.1f} ms", "<= +20 ms",
                        verdict(engine - direct <= 0.02)))  # fmt: skip
    if "engine_podman" in data:
        e = data["engine_podman"]
        podman, run = e["podman_run"]["median_s"], e["cryptlayer_run"]["median_s"]
        out.append(("12. `podman run --rm --runtime cryptlayer-runtime` of an image, start to"
                    " exit of `true`", ms(podman), f"`cryptlayer run` of the same image {ms(run)}",
                    f"{podman / run:.2f}x", "<= 1.2x", verdict(podman / run <= 1.2)))  # fmt: skip
        traced = e["traced"]
        calls = ", ".join(f"{name} {c['calls']:.0f}x {ms(c['s'])}"
                          for name, c in sorted(traced["runtime_calls"].items()))  # fmt: skip
        shared = e["in_process"]
        out.append(("12. where that podman run's time goes (one traced run)",
                    f"{ms(traced['total_s'])}: the runtime's calls {ms(traced['runtime_s'])}"
                    f" ({calls}), podman and conmon {ms(traced['podman_own_s'])}",
                    f"in-process start {ms(shared['start']['median_s'])}, stop"
                    f" {ms(shared['stop']['median_s'])}; bare python"
                    f" {ms(e['bare_python']['median_s'])}", "", "", ""))  # fmt: skip
    return out


def _ocicrypt_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 13: `build --decryption-key` of a skopeo-encrypted image against `build` of the
    same layers unencrypted, in the VM; and the reading side of both on the host's real CPU."""
    out: list[Row] = []
    if "ocicrypt" in data:
        o = data["ocicrypt"]
        plain, enc = o["plain_build"], o["encrypted_build"]
        what = (f"{o['content']['bytes'] / MiB_F:.0f} MiB, {o['content']['files']} files,"
                f" {o['layers']} gzip layers of {o['blob_bytes'] / MiB_F:.0f} MiB")  # fmt: skip
        out.append((f"13. `build --decryption-key` of an ocicrypt (jwe:) image ({what})",
                    f"{enc['mib_s']:.1f} MiB/s ({ms(enc['median_s'])})",
                    f"`build` of the same layers unencrypted {plain['mib_s']:.1f} MiB/s"
                    f" ({ms(plain['median_s'])})", f"{o['ratio']:.2f}",
                    ">= 0.80", verdict(o["ratio"] >= 0.8)))  # fmt: skip
        st = o["stream"]
        out.append(("13. in that VM, every blob read once (warm cache)",
                    f"through the decrypting stream {st['decrypting_check']['mib_s']:.0f} MiB/s",
                    f"read and hashed as the plain build checks it"
                    f" {st['plain_check']['mib_s']:.0f} MiB/s; gunzip and hash of the tars"
                    f" {st['decompress_hash']['mib_s']:.0f} MiB/s of blob",
                    "", "", ""))  # fmt: skip
    if "ocicrypt_host" in data:
        h = data["ocicrypt_host"]
        out.append(("13. on the host's real CPU, CPU seconds: a build's reading side (measure"
                    " and populate into a directory, no device-mapper)",
                    f"{h['encrypted_build_reads_mib_s']:.0f} MiB/s decrypting",
                    f"the same layers unencrypted {h['plain_build_reads_mib_s']:.0f} MiB/s",
                    f"{h['ratio']:.2f}", ">= 0.80 (whole build)",
                    verdict(h["ratio"] >= 0.8) + " (reading side only)"))  # fmt: skip
        out.append(("13. on the host's real CPU: one blob read once",
                    f"through the decrypting stream {h['blob_mib_s']['encrypted']:.0f} MiB/s",
                    f"read and hashed {h['blob_mib_s']['plain']:.0f} MiB/s",
                    "", "", ""))  # fmt: skip
    return out


def _faster(ratio: float) -> str:
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def _lazies(data: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Figure 14's runs, smallest image first: (MiB, figures)."""
    return sorted(
        (int(k.split("_")[1]), v)
        for k, v in data.items()
        if k.startswith("lazy_") and k.split("_")[1].isdigit()
    )


def _lazy_rows(data: dict[str, Any]) -> list[Row]:
    """Figure 14: lazy start against pull + run and ocicrypt's decrypt + untar; bytes fetched
    against bytes read; the second start; sequential reads through the lazy device."""
    out: list[Row] = []
    lazies = _lazies(data)
    for size, f in lazies:
        for link, label in (("shaped", "100 Mbit/s, 20 ms"), ("local", "local registry")):
            w = f[link]
            lazy, pull, oci = (w[k]["median_s"] for k in ("lazy", "pull_run", "ocicrypt"))
            out.append((f"14. time to the job's first output, {size} MiB image, {label}",
                        f"lazy {ms(lazy)}",
                        f"pull + run {ms(pull)}; skopeo decrypt + untar {ms(oci)}",
                        f"{_faster(pull / lazy)} than pull + run; {_faster(oci / lazy)} than"
                        " decrypt + untar",
                        ">= 5x faster than pull + run" if link == "shaped" else "",
                        verdict(pull / lazy >= 5) if link == "shaped" else ""))  # fmt: skip
        j = f["job_reads"]
        if "error" in j:
            continue
        read = j["device_read_bytes"] + f["header_bytes"] + f["small_files_bytes"]
        fetched = j["fetched_bytes"] + f["small_files_bytes"]
        out.append((f"14. bytes a lazy start fetched, {size} MiB image",
                    f"{fetched / MiB_F:.1f} MiB ({fetched / f['image_bytes']:.1%} of the image)",
                    f"the job's reads from the devices {j['device_read_bytes'] / MiB_F:.1f} MiB,"
                    f" + headers {f['header_bytes'] / MiB_F:.2f} MiB and trees and small files"
                    f" {f['small_files_bytes'] / MiB_F:.2f} MiB",
                    f"{fetched / read:.2f}x", "<= 2x", verdict(fetched <= 2 * read)))  # fmt: skip
        again = f["shaped"]["lazy_second_fetched_bytes"] + f["local"]["lazy_second_fetched_bytes"]
        first, second = (f["shaped"][k]["median_s"] for k in ("lazy", "lazy_second"))
        out.append((f"14. second lazy start on the node, {size} MiB image (cache kept)",
                    f"{max(again)} layer bytes fetched",
                    f"first start {ms(first)} (100 Mbit/s), second {ms(second)}", "", "0 bytes",
                    verdict(max(again) == 0)))  # fmt: skip
    if len(lazies) > 1:
        (small, a), (big, b) = lazies[0], lazies[-1]
        for link in ("shaped", "local"):
            ratio = b[link]["lazy"]["median_s"] / a[link]["lazy"]["median_s"]
            out.append((f"14. lazy start, {big} MiB vs {small} MiB image"
                        f" ({'100 Mbit/s, 20 ms' if link == 'shaped' else 'local registry'})",
                        f"{ratio:.2f}x", "", "", "<= 1.3x",
                        verdict(ratio <= 1.3)))  # fmt: skip
    done = [(size, f) for size, f in lazies if "error" not in f["sequential"]]
    if done:
        size, f = done[-1]
        q = f["sequential"]
        for kind, label in (("cold", "block cache empty"), ("warm", "block cache full")):
            share = q[f"{kind}_share"]
            out.append((f"14. sequential read through the lazy device, local registry, {label}"
                        f" ({q['bytes'] / MiB_F:.0f} MiB of {size} MiB image)",
                        f"{q[f'lazy_{kind}']['mib_s']:.1f} MiB/s",
                        f"a pulled copy {q['pulled']['mib_s']:.1f} MiB/s", f"{share:.0%}",
                        ">= 50%" if kind == "cold" else "",
                        verdict(share >= 0.5) if kind == "cold" else ""))  # fmt: skip
    if "lazy_chunks" in data:
        c = data["lazy_chunks"]
        for chunk in sorted((k for k in c if k.isdigit()), key=int):
            per = c[chunk]
            out.append((f"14. chunk of {int(chunk) // 1024} KiB, {c['size_mib']} MiB image,"
                        " 100 Mbit/s, 20 ms: first output; fetched",
                        f"{ms(per['first_output']['median_s'])};"
                        f" {max(per['fetched_bytes']) / MiB_F:.1f} MiB",
                        "sequential read, cache empty:"
                        f" {per['sequential_shaped']['mib_s']:.1f} MiB/s shaped,"
                        f" {per['sequential_local']['mib_s']:.1f} MiB/s local",
                        "", "", ""))  # fmt: skip
    return out


def plot_lazy(data: dict[str, Any], out: Path) -> bool:
    """Figure 14's plot: time to the job's first output against image size, the three ways, on
    the shaped link (solid) and the local registry (dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lazies = _lazies(data)
    if not lazies:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.8))
    xs = [s for s, _ in lazies]
    names = (("lazy", "lazy `run docker://`"), ("pull_run", "`pull` + `run`"),
             ("ocicrypt", "skopeo decrypt + untar (ocicrypt)"))  # fmt: skip
    for n, (way, label) in enumerate(names):
        for link, style in (("shaped", "-"), ("local", "--")):
            ax.plot(xs, [f[link][way]["median_s"] for _, f in lazies], f"o{style}",
                    color=f"C{n}", label=f"{label}, "
                    + ("100 Mbit/s 20 ms" if link == "shaped" else "local"))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x} MiB" for x in xs])
    ax.set_xlabel("image content")
    ax.set_ylabel("seconds to the job's first output (median)")
    ax.set_title("Lazy start against image size (figure 14)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lazy-start.png", dpi=110)
    return True


def process_rows(p: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """Figure 11: a one-layer `start` as a process, against the same steps by hand and against
    decrypt+untar of the same real tree; and where the process's time goes."""
    proc, hand = p["start_as_process"]["median_s"], p["by_hand"]["median_s"]
    base = p["baseline_decrypt_untar"]["median_s"]
    tree = f"{p['content']['bytes'] / MiB_F:.0f} MiB, {p['content']['files']} real files"
    bare, imports = p["bare_python"]["median_s"], p["import_cli"]["median_s"]
    split = p["in_process"]
    programs = ", ".join(f"{name} {ms(t)}" for name, t in sorted(split["programs_s"].items()))
    return [
        (
            f"11. `start` as a process, 1 layer ({tree})",
            ms(proc),
            f"the same steps by hand (bash) {ms(hand)}",
            f"{proc / hand:.2f}x",
            "<= 1.5x",
            verdict(proc / hand <= 1.5),
        ),
        *_warm_rows(p),
        (
            "11. the same start in-process (no interpreter start-up)",
            ms(split["total_s"]),
            f"the same steps by hand (bash) {ms(hand)}",
            f"{split['total_s'] / hand:.2f}x",
            "",
            "",
        ),
        (
            "11. `start` as a process, the same tree",
            ms(proc),
            f"decrypt+untar {ms(base)}",
            f"{base / proc:.1f}x faster",
            ">= 2x faster",
            verdict(base / proc >= 2),
        ),
        (
            "11. where that process's time goes",
            f"the start itself {ms(split['total_s'])} (in-process); Python around it"
            f" {ms(proc - split['total_s'])}: a warm interpreter {ms(bare)}, the CLI's import"
            f" {ms(imports - bare)} (warm), and {ms(proc - split['total_s'] - imports)} more"
            " (the start path's further imports, after the cache drop; not split further)",
            f"of which programs: {programs}; udev waits {ms(split['udev_waits_s'])};"
            f" fsyncs {ms(split['fsync_s'])}; cryptlayer's own Python {ms(split['rest_s'])}",
            "",
            "",
            "",
        ),
    ]


def _warm_rows(p: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """Figure 11 again with the programs' files in the page cache (the image cold), both sides."""
    if "start_as_process_warm" not in p:  # results from before the warm rows
        return []
    proc, hand = p["start_as_process_warm"]["median_s"], p["by_hand_warm"]["median_s"]
    return [
        (
            "11. the same, programs' files cached (the image cold)",
            ms(proc),
            f"the same steps by hand (bash) {ms(hand)}",
            f"{proc / hand:.2f}x",
            "<= 1.5x",
            verdict(proc / hand <= 1.5),
        )
    ]


def plot(data: dict[str, Any], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = sorted((int(k.split("_")[1]), v) for k, v in data.items() if k.startswith("size_"))
    if not sizes:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.8))
    xs = [s for s, _ in sizes]
    ax.plot(
        xs,
        [f["baseline_decrypt_untar"]["median_s"] for _, f in sizes],
        "o-",
        label="decrypt + untar (openssl AES-256, tar)",
    )
    for layers in sorted(sizes[0][1]["layers"], key=int):
        points = [
            (size, f["layers"][layers]["start"]["median_s"])
            for size, f in sizes
            if layers in f["layers"]
        ]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "s-",
            label=f"cryptlayer start, {layers} layer(s)",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x} MiB" for x in xs])
    ax.set_xlabel("image content")
    ax.set_ylabel("seconds to a mounted root file system (median)")
    ax.set_title("Start latency against image size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "start-latency.png", dpi=110)
    return True


def main() -> None:
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    out = results.parent
    data = json.loads(results.read_text())
    lines = [
        "# Benchmarks",
        "",
        "Regenerated by `make bench` (see bench/); every figure is a median, with its baseline "
        "measured in the same run on the same machine. Device figures come from the VM "
        "below; where it is a software-emulated CPU, they are valid as ratios only.",
        "",
    ]
    hosts = (
        ("machine_vm", "VM (figures 1-7)"),
        ("machine_host", "host (figure 8, and rows so marked)"),
    )
    for key, title in hosts:
        if key in data:
            m = data[key]
            lines.append(
                f"- {title}: {m['cpu']}, {m['cpus']} CPUs, {m['memory_mib']} MiB, kernel"
                f" {m['kernel']}, virtualization {m['virtualization']}, software emulation"
                f" {m['software_emulation']}; {m['cryptsetup']}"
            )
    when = data.get("generated", {})
    sections = sorted(k for k in when if not k.startswith(("machine", "cli_startup")))
    if sections:  # a section can be re-run alone (BENCH_ARGS): say when each one was measured
        lines.append(
            "- measured (UTC): "
            + ", ".join(f"{k} {when[k][:16].replace('T', ' ')}" for k in sections)
        )
    if "cli_startup_vm" in data:
        v = data["cli_startup_vm"]
        lines.append(
            f"- CLI start-up inside that VM: `--help` {ms(v['help']['median_s'])}, bare"
            f" python {ms(v['bare_python']['median_s'])}; figures 1-6 call cryptlayer"
            " in-process, so they exclude it (figure 1 also shows it as a process)."
        )
    if "cli_startup_vm" in data and "cli_startup_host" in data:
        vm = data["cli_startup_vm"]["bare_python"]["median_s"]
        host = data["cli_startup_host"]["bare_python"]["median_s"]
        lines.append(
            f"- A bare Python interpreter starts {vm / host:.0f}x slower in the VM than on the"
            " host: CPU-bound steps (starting programs, key derivation) are slowed about that"
            " much, disk-bound ones far less."
        )
    lines += [
        "",
        "| figure | cryptlayer | baseline | ratio | target | |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(data)]
    if plot(data, out):
        lines += ["", "![start latency](start-latency.png)"]
    if plot_lazy(data, out):
        lines += ["", "![lazy start](lazy-start.png)"]
    notes = out / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()

"""Training on a rented GPU machine (experiments/gpu_pack.sh, train_gpu.sh, gpu_unpack.sh): what travels there and
back.

Out: the latent cache as the VQGAN's code indices, bit-packed. A cache holds fp16 latents z (N x 2 flips x C x h x w,
164 MB for the 10,010 WikiArt-mini paintings); the pack holds for each position the index k of its nearest code,
k = argmin_j |z - e_j|^2 over the codebook e (what VectorQuantizer computes), in ceil(log2 K) bits (11 for K = 2048:
28 MB). Unpacked, each latent becomes e_k = z_q, the quantised latent: the VQGAN decoder quantises first, so z_q
decodes to the same image as z (the same codes), and what the UNet trains on differs from the cache only by
z - z_q, which the pack measures (`quantisation_error`). Back: exports split into parts (the GPU machine returns
at most 8 files of 16 MiB) with a sha256 manifest, joined and checked before anything is installed.

    python packing.py latents --latent_cache runs/latents --vqgan_ckpt models/vqgan --out .gpu/latents
    python packing.py size --carry .gpu --limit_mib 60          # what would be sent to the GPU; refuses above
    python packing.py split runs/gpu/models/unet-uncond.safetensors runs/gpu/models/unet-uncond.json \\
        --name unet-uncond --out "$OUT"                           # parts + OUT/manifest.json
    python packing.py join DIR --dest models                      # check every part and file, then install
    python packing.py shelve models/unet-uncond.safetensors ...   # untrack + exclude while away; --restore undoes
    python packing.py timeline runs/gpu/unet-uncond/log.jsonl     # a few lines of log.jsonl for a log file
"""
import hashlib
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import torch

from checkpoints import atomic_write_bytes, atomic_write_json, load_state_dir, read_json, save_state_dir
from cli import ArgumentParser, UserError, positive_float, positive_int, run_cli

PACK_FORMAT = 1
MIB = 1 << 20
PART_BYTES = 15 * MIB          # under the 16 MiB per file that the GPU machine returns
MAX_RETURNED_FILES = 8         # the GPU machine returns at most 8 files from $OUT
SHELF_BEGIN = "# noise2art gpu_pack: untracked while on a GPU machine; `python packing.py shelve --restore` re-tracks"
SHELF_END = "# end of noise2art gpu_pack"

# ----------------------------------------------------------------------------------------------
# Bits: non-negative integers below 2**bits, `bits` each, least significant bit first, back to back.

CHUNK = 1 << 20  # values per chunk: a multiple of 8, so each chunk ends on a byte boundary


def pack_bits(values, bits):
    """int tensor (any shape, 0 <= v < 2**bits, bits <= 16) -> uint8 tensor of ceil(n * bits / 8) bytes."""
    flat = values.reshape(-1).numpy().astype("<u2")
    chunks = []
    for start in range(0, len(flat), CHUNK):
        planes = np.unpackbits(flat[start:start + CHUNK].view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")
        chunks.append(np.packbits(planes[:, :bits], bitorder="little"))  # n x bits -> n * bits / 8 bytes
    return torch.from_numpy(np.concatenate(chunks))


def unpack_bits(packed, bits, count):
    """Inverse of pack_bits: the first `count` values, int64."""
    data = packed.numpy()
    chunk_bytes = CHUNK * bits // 8
    values = []
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        first = start // CHUNK * chunk_bytes
        planes = np.unpackbits(data[first:first + chunk_bytes], count=n * bits, bitorder="little").reshape(n, bits)
        planes = np.pad(planes, ((0, 0), (0, 16 - bits)))  # n x 16
        values.append(np.packbits(planes, axis=1, bitorder="little").view("<u2").reshape(n))
    return torch.from_numpy(np.concatenate(values).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Latents <-> codes


def codebook_of(vqgan):
    """The VQGAN's codebook, K x C float32 on the CPU."""
    return vqgan.quantize.embedding.weight.detach().float().cpu()


def codebook_digest(codebook):
    return hashlib.sha256(codebook.contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def latent_codes(latents, vqgan, images_per_chunk=16):
    """Cached latents N x F x C x h x w -> code indices N x F x h x w, by the VQGAN's own quantiser (fp32)."""
    _, flips, c, h, w = latents.shape
    codes = []
    for chunk in latents.split(images_per_chunk):
        _, _, indices = vqgan.quantize(chunk.reshape(-1, c, h, w).float())
        codes.append(indices.reshape(-1, flips, h, w).cpu())
    return torch.cat(codes)


def quantisation_error(latents, quantised, latent_scale):
    """How far the unpacked latents are from the cache's: rms(z - z_q), rms(z), their ratio, and the rms error in
    the diffusion's units (z * latent_scale, about unit variance)."""
    diff = (latents.double() - quantised.double()).pow(2).mean().sqrt().item()
    rms = latents.double().pow(2).mean().sqrt().item()
    return {"rms_error": diff, "rms_latent": rms, "relative": diff / rms, "rms_error_scaled": diff * latent_scale}


def pack_cache(cache, vqgan):
    """A latent cache (trainer.py) -> the same dict with "latents" replaced by bit-packed codes."""
    codebook = codebook_of(vqgan)
    codes = latent_codes(cache["latents"], vqgan)
    bits = max(1, math.ceil(math.log2(len(codebook))))
    if bits > 16:
        raise UserError(f"a codebook of {len(codebook)} codes needs {bits} bits a code; packing.py stores 16 at most")
    quantised = codebook[codes].permute(0, 1, 4, 2, 3)  # N x F x h x w x C -> N x F x C x h x w
    packed = {k: v for k, v in cache.items() if k != "latents"}
    packed.update(pack_format=PACK_FORMAT, codes=pack_bits(codes, bits), code_bits=bits, codes_shape=list(codes.shape),
                  codebook_sha256=codebook_digest(codebook),
                  quantisation_error=quantisation_error(cache["latents"], quantised, cache["latent_scale"]))
    return packed


def unpack_cache(packed, vqgan):
    """Inverse of pack_cache: "latents" = the quantised latents z_q (N x F x C x h x w, float32, where the cache
    holds z in fp16). The VQGAN must have the codebook the pack was made with."""
    codebook = codebook_of(vqgan)
    if packed.get("pack_format") != PACK_FORMAT:
        raise UserError(f"packed latents of format {packed.get('pack_format')}, this code reads {PACK_FORMAT}")
    if packed["codebook_sha256"] != codebook_digest(codebook):
        raise UserError("the packed latents were made with another VQGAN codebook than --vqgan_ckpt's")
    shape = packed["codes_shape"]
    codes = unpack_bits(packed["codes"], packed["code_bits"], math.prod(shape)).reshape(shape)
    cache = {k: v for k, v in packed.items() if k not in ("codes", "code_bits", "codes_shape", "pack_format")}
    cache["latents"] = codebook[codes].permute(0, 1, 4, 2, 3).contiguous()  # float32: the codes' own values
    return cache


def read_packed_latents(path, vqgan):
    """The latent cache a pack at `path` (a save_state_dir folder) stands for; see unpack_cache."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise UserError(f"--packed_latents {path} is not packed latents (make them with packing.py latents)")
    packed = load_state_dir(path)
    if not isinstance(packed, dict) or "codes" not in packed:
        raise UserError(f"--packed_latents {path} is not packed latents (make them with packing.py latents)")
    return unpack_cache(packed, vqgan)


# ----------------------------------------------------------------------------------------------
# Parts: files -> parts of at most PART_BYTES, each stage listed in OUT/manifest.json with sha256 digests


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def split_files(paths, name, out, part_bytes=PART_BYTES, max_files=MAX_RETURNED_FILES):
    """Concatenate `paths`, cut the bytes into OUT/NAME.partNN and add stage NAME (its files and parts, sizes and
    sha256) to OUT/manifest.json. Refuses if OUT would then hold more than `max_files` files."""
    out = Path(out)
    files = [(Path(p).name, Path(p).read_bytes()) for p in paths]
    data = b"".join(content for _, content in files)
    pieces = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)] or [b""]
    existing = {p.name for p in out.glob("*") if p.is_file()} - {f"{name}.part{i:02d}" for i in range(len(pieces))}
    total = len(existing | {"manifest.json"}) + len(pieces)
    if total > max_files:
        raise UserError(f"{out} would hold {total} files, more than the {max_files} the GPU machine returns")
    manifest = read_json(out / "manifest.json", "manifest") if (out / "manifest.json").is_file() else {"stages": {}}
    parts = []
    for i, piece in enumerate(pieces):
        part = f"{name}.part{i:02d}"
        atomic_write_bytes(out / part, piece)
        parts.append({"name": part, "bytes": len(piece), "sha256": sha256(piece)})
    listed = [{"name": n, "bytes": len(c), "sha256": sha256(c)} for n, c in files]
    manifest["stages"][name] = {"files": listed, "parts": parts}
    atomic_write_json(out / "manifest.json", manifest)
    return [out / p["name"] for p in parts]


def join_stage(folder, name, stage):
    """{file name: bytes} of one manifest stage, every part and file checked against its sha256."""
    data = bytearray()
    for part in stage["parts"]:
        path = Path(folder) / part["name"]
        if not path.is_file():
            raise UserError(f"{name}: part {path} is missing")
        piece = path.read_bytes()
        if len(piece) != part["bytes"] or sha256(piece) != part["sha256"]:
            raise UserError(f"{name}: part {path} does not match its sha256 in the manifest (corrupted or truncated)")
        data += piece
    files, offset = {}, 0
    for entry in stage["files"]:
        if Path(entry["name"]).name != entry["name"]:
            raise UserError(f"{name}: manifest file name {entry['name']!r} is not a plain file name")
        content = bytes(data[offset:offset + entry["bytes"]])
        offset += entry["bytes"]
        if len(content) != entry["bytes"] or sha256(content) != entry["sha256"]:
            raise UserError(f"{name}: joined file {entry['name']} does not match its sha256 in the manifest")
        files[entry["name"]] = content
    if offset != len(data):
        raise UserError(f"{name}: the parts hold {len(data) - offset} bytes more than the manifest's files")
    return files


def join_files(folder, dest):
    """Check every stage of FOLDER/manifest.json, then write its files into `dest` (atomically, one by one).
    Nothing is written unless every stage checks out. Returns the paths written."""
    manifest = read_json(Path(folder) / "manifest.json", "manifest")
    stages = manifest.get("stages")
    if not stages:
        raise UserError(f"{folder}/manifest.json lists no finished stage: nothing to install")
    joined = {name: join_stage(folder, name, stage) for name, stage in stages.items()}
    written = []
    for files in joined.values():
        for file_name, content in files.items():
            atomic_write_bytes(Path(dest) / file_name, content)
            written.append(Path(dest) / file_name)
    return written


# ----------------------------------------------------------------------------------------------
# The travelling tree: what is sent to the GPU machine (tracked and untracked-not-ignored files, shared/, carried
# paths)


def git(repo, *args):
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise UserError(f"git {' '.join(args)} failed in {repo}: {result.stderr.strip()}")
    return result.stdout


def tree_files(repo):
    """Files of `repo` sent without `carry`: tracked (present on disk) and untracked-not-ignored ones,
    and the folder shared/ if the checkout has one."""
    listed = git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    files = {Path(repo) / name for name in listed if name}
    shared = Path(repo) / "shared"
    if shared.is_dir():
        files |= {p for p in shared.rglob("*") if not p.is_dir()}
    return {p for p in files if p.is_file() or p.is_symlink()}


def carried_files(repo, carry):
    files = set()
    for path in (Path(repo) / c for c in carry):
        files |= {p for p in path.rglob("*") if not p.is_dir()} if path.is_dir() else {path} if path.exists() else set()
    return files


def travelling_size(repo, carry=(), leave_out=()):
    """(bytes of the tree, bytes of the carried paths, total): what would be sent from `repo`, less the files
    `leave_out` (paths relative to `repo` that would stay behind once shelved)."""
    tree, carried = tree_files(repo), carried_files(repo, carry)
    tree -= {Path(repo) / p for p in leave_out}
    tree_bytes = sum(p.lstat().st_size for p in tree - carried)
    carried_bytes = sum(p.lstat().st_size for p in carried)
    return tree_bytes, carried_bytes, tree_bytes + carried_bytes


# ----------------------------------------------------------------------------------------------
# Shelving: tracked files kept out of what is sent (untracked and excluded), re-tracked afterwards


def exclude_file(repo):
    return Path(repo) / git(repo, "rev-parse", "--git-path", "info/exclude").strip()


def shelved_paths(repo):
    """Paths an earlier `shelve` untracked (read from the marked block of .git/info/exclude)."""
    path = exclude_file(repo)
    lines = path.read_text().splitlines() if path.is_file() else []
    if SHELF_BEGIN not in lines:
        return []
    block = lines[lines.index(SHELF_BEGIN) + 1:]
    return [line.lstrip("/") for line in block[:block.index(SHELF_END)]]


def shelve(repo, paths):
    """Untrack `paths` (git rm --cached; the files stay on disk) and exclude them, so that they are not sent; a no-op
    if exactly these are shelved already. Refuses files with uncommitted changes (re-tracking would forget them)."""
    shelved = shelved_paths(repo)
    if shelved and sorted(shelved) == sorted(paths):
        return
    if shelved:
        raise UserError(f"already shelved: {', '.join(shelved)} (first: packing.py shelve --restore)")
    git(repo, "ls-files", "--error-unmatch", "--", *paths)
    if git(repo, "status", "--porcelain", "--", *paths).strip():
        raise UserError(f"{', '.join(paths)}: uncommitted changes; commit them before shelving")
    git(repo, "rm", "-q", "--cached", "--", *paths)
    path = exclude_file(repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else ""
    block = "\n".join([SHELF_BEGIN, *(f"/{p}" for p in paths), SHELF_END])
    path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + block + "\n")


def restore(repo):
    """Undo shelve: re-track the shelved paths (the index entry from HEAD; the file on disk is kept as it is, a new
    model there shows as modified) and drop the exclude block. Returns the paths."""
    paths = shelved_paths(repo)
    if not paths:
        return []
    git(repo, "reset", "-q", "--", *paths)
    path = exclude_file(repo)
    lines = path.read_text().splitlines()
    begin, end = lines.index(SHELF_BEGIN), lines.index(SHELF_END)
    path.write_text("".join(line + "\n" for line in lines[:begin] + lines[end + 1:]))
    return paths


# ----------------------------------------------------------------------------------------------
# Timeline: a few lines of a trainer log.jsonl


def timeline(log_path, max_lines=8):
    """At most `max_lines` evenly spaced entries of log.jsonl (the last always) as 'step S  epoch E  N samples/s
    loss L' lines."""
    path = Path(log_path)
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not entries:
        return [f"{log_path}: no log entries"]
    stride = max(1, math.ceil(len(entries) / max_lines))
    chosen = entries[:-1][::stride][:max_lines - 1] + [entries[-1]]
    return [f"step {e['step']:6d}  epoch {e['epoch']:7.2f}  {e['samples_per_s']:8.1f} samples/s  loss {e['loss']:.4f}"
            for e in chosen]


# ----------------------------------------------------------------------------------------------
# Command line


def cmd_latents(args):
    from vqgan import load_vqgan

    cache = load_state_dir(args.latent_cache)
    if not isinstance(cache, dict) or "latents" not in cache:
        raise UserError(f"--latent_cache {args.latent_cache} is not a latent cache (trainer.py writes them)")
    packed = pack_cache(cache, load_vqgan(args.vqgan_ckpt))
    save_state_dir(args.out, packed)
    size = sum(p.stat().st_size for p in Path(args.out).iterdir())
    error = packed["quantisation_error"]
    print(f"packed {packed['codes_shape'][0]} images x {packed['codes_shape'][1]} flips as {packed['code_bits']}-bit "
          f"codes: {size / MIB:.1f} MiB in {args.out} (the cache's fp16 latents: "
          f"{cache['latents'].numel() * 2 / MIB:.1f} MiB); z - z_q: rms {error['rms_error']:.4f} of rms "
          f"{error['rms_latent']:.4f} ({error['relative']:.1%}), {error['rms_error_scaled']:.4f} scaled")
    return 0


def cmd_size(args):
    tree, carried, total = travelling_size(args.repo, args.carry, args.leave_out)
    left = f", without {' '.join(args.leave_out)}" if args.leave_out else ""
    print(f"travelling tree: {tree / MIB:.1f} MiB (tracked + untracked-not-ignored{left}) + {carried / MIB:.1f} MiB "
          f"carried ({' '.join(args.carry) or 'nothing'}) = {total / MIB:.1f} MiB (limit {args.limit_mib:g} MiB)")
    if total > args.limit_mib * MIB:
        raise UserError(f"this would send {total / MIB:.1f} MiB, over {args.limit_mib:g} MiB: "
                        "shelve the shipped UNets (experiments/gpu_pack.sh does) or carry less")
    return 0


def cmd_split(args):
    parts = split_files(args.files, args.name, args.out, int(args.part_mib * MIB))
    print(f"{args.name}: {len(parts)} parts in {args.out} ({', '.join(p.name for p in parts)})")
    return 0


def cmd_join(args):
    for path in join_files(args.folder, args.dest):
        print(f"installed {path}")
    return 0


def cmd_shelve(args):
    if args.restore:
        paths = restore(args.repo)
        print(f"re-tracked {', '.join(paths)}" if paths else "nothing was shelved")
        return 0
    if not args.paths:
        raise UserError("name the tracked files to shelve, or pass --restore")
    shelve(args.repo, args.paths)
    print(f"shelved {', '.join(args.paths)}: untracked and excluded until packing.py shelve --restore")
    return 0


def cmd_timeline(args):
    print("\n".join(timeline(args.log, args.max_lines)))
    return 0


def parse_args(argv=None):
    p = ArgumentParser(__file__, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True,  # subcommand errors are one line too
                           parser_class=lambda prog, **kwargs: ArgumentParser(__file__, **kwargs))
    s = sub.add_parser("latents", help="pack a latent cache as bit-packed VQGAN codes")
    s.add_argument("--latent_cache", required=True, help="latent cache folder written by trainer.py")
    s.add_argument("--vqgan_ckpt", required=True, help="the VQGAN the cache was encoded with")
    s.add_argument("--out", required=True, help="folder for the packed latents (trainer.py --packed_latents)")
    s.set_defaults(run=cmd_latents)
    s = sub.add_parser("size", help="print what would be sent to the GPU machine; refuse above --limit_mib")
    s.add_argument("--repo", default=".", help="the checkout that is sent (default: .)")
    s.add_argument("--carry", nargs="*", default=[], help="ignored paths sent along with it (default: none)")
    s.add_argument("--leave_out", nargs="*", default=[],
                   help="tracked files not to count, as if shelved (SMOKE=1 gpu_pack.sh; default: none)")
    s.add_argument("--limit_mib", type=positive_float, default=60,
                   help="refuse above this many MiB (default: 60)")
    s.set_defaults(run=cmd_size)
    s = sub.add_parser("split", help="cut files into parts and add them to OUT/manifest.json")
    s.add_argument("files", nargs="+", help="files of one stage, e.g. NAME.safetensors NAME.json")
    s.add_argument("--name", required=True, help="stage name: parts are NAME.partNN")
    s.add_argument("--out", required=True, help="folder of the parts and manifest.json (train_gpu.sh's $OUT)")
    s.add_argument("--part_mib", type=positive_float, default=PART_BYTES / MIB,
                   help="part size in MiB (default: 15)")
    s.set_defaults(run=cmd_split)
    s = sub.add_parser("join", help="check the parts against FOLDER/manifest.json and install the files")
    s.add_argument("folder", help="folder holding manifest.json and the parts")
    s.add_argument("--dest", required=True, help="folder the joined files are written to")
    s.set_defaults(run=cmd_join)
    s = sub.add_parser("shelve", help="untrack and exclude tracked files while away; --restore re-tracks")
    s.add_argument("paths", nargs="*", help="tracked files to leave behind, relative to --repo")
    s.add_argument("--repo", default=".", help="the checkout (default: .)")
    s.add_argument("--restore", action="store_true", help="re-track what was shelved and drop its exclude lines")
    s.set_defaults(run=cmd_shelve)
    s = sub.add_parser("timeline", help="a few evenly spaced lines of a trainer log.jsonl")
    s.add_argument("log", help="log.jsonl of a trainer.py run")
    s.add_argument("--max_lines", type=positive_int, default=8, help="lines at most (default: 8)")
    s.set_defaults(run=cmd_timeline)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    run_cli(main)

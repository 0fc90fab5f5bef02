"""The offload planner: its arithmetic against llama.cpp's own accounting, and its choices.

llama.cpp is asked through no_alloc loads of full-size sparse skeletons (``gguf_mtp.planning.probe``): it simulates
every allocation without reading a byte of weights, on this CPU-only build (whose compute buffers stand in for CUDA's).
The full matrix is bench/plan_matrix.py; this is the small one CI runs.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.planning import memory, placement, search
from gguf_mtp.planning.memory import GiB, MiB
from gguf_mtp.planning.placement import layer_devices, split_device, split_points
from gguf_mtp.planning.search import devices_from
from gguf_mtp.settings import RuntimeSettings, load_plan_settings

EXACT = 0.005  # weights and KV cache
COMPUTE = 0.10  # compute buffers (allocator fragmentation is modelled, not simulated)
SMALL = 2 * MiB  # compute buffers below this are compared absolutely (a few input rows dominate)


# --- arithmetic --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    ((4096, 512, 512), (4096, 4096, 1024, 1)),  # sliding = pad(512 + 512, 256)
    ((1000, 512, 512), (1024, 1024, 1024, 1)),  # n_ctx padded to 256; sliding capped at full
    ((131072, 512, 1024), (131072, 131072, 1536, 1)),
    ((131072, 9, 1024), (131072, 131072, 1280, 1)),  # pad(1024 + 9, 256)
    ((8192, 512, 1024, 4, True), (8192, 8192, 4608, 1)),  # llama-server's 4 unified slots: 4 windows
    ((8192, 512, 1024, 2, False), (8192, 4096, 1536, 2)),  # per-sequence streams
])
def test_kv_cells(args, expected) -> None:
    c = memory.kv_cells(*args)
    assert (c.n_ctx, c.full, c.sliding, c.streams) == expected


def test_kv_cells_swa_full() -> None:
    assert memory.kv_cells(8192, 512, 1024, swa_full=True).sliding == 8192


@pytest.mark.parametrize("n_ubatch, n_seq, tokens, outputs", [
    (512, 1, 512, 512),
    (9, 1, 9, 9),
    (9, 4, 12, 9),  # llama.cpp's graph_reserve rounds the tokens up to a whole number per sequence
    (8, 8, 8, 8),
])
def test_graph_shape_tokens_per_sequence(n_ubatch, n_seq, tokens, outputs) -> None:
    cells = memory.kv_cells(16384, n_ubatch, 1024, n_seq, n_seq > 1)
    g = memory.graph_shape(16384, n_ubatch, n_ubatch, 0, cells, True, n_seq)
    assert (g.n_tokens, g.n_outputs) == (tokens, outputs)


@pytest.mark.parametrize("n_parallel, draft_max, n_batch", [(1, None, 512), (4, 3, 512), (8, None, 32), (64, 8, 512)])
def test_context_shapes_are_the_engines(n_parallel, draft_max, n_batch) -> None:
    """The planner prices the contexts runtime/engine.py makes (``_context_params``, ``draft_rows_max``)."""
    from gguf_mtp.runtime.engine import _context_params

    s = RuntimeSettings(n_ctx=8192 * n_parallel, n_batch=n_batch, n_parallel=n_parallel, draft_max=draft_max)
    k = placement.k_max(s)
    shapes = placement.context_shapes(s, drafter=True)
    cp = _context_params(s, k, n_parallel)
    fields = ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "kv_unified")
    assert {f: shapes["target"][f] for f in fields} == {f: getattr(cp, f) for f in fields}
    assert shapes["drafter"]["n_batch"] == shapes["drafter"]["n_ubatch"] == max(1, k + 1, n_parallel)
    assert shapes["drafter"]["n_seq_max"] == n_parallel and shapes["drafter"]["kv_unified"] == (n_parallel > 1)


# a sliding layer (256 wide), a full one (512), a KV-shared one; 1024 sliding cells, 4096 full ones; f16 rows
KV_LAYERS = [memory.AttnLayer(True, 256, 8, 1), memory.AttnLayer(False, 512, 8, 1),
             memory.AttnLayer(True, 256, 8, 1, owns_kv=False)]


@pytest.mark.parametrize("flash_attn, expected", [
    (True, [1024 * (512 + 512), 4096 * (1024 + 1024), 0]),
    (False, [1024 * (512 + 1024), 4096 * (1024 + 1024), 0]),  # V rows padded to the widest layer's
])
def test_kv_bytes(flash_attn: bool, expected: list[int]) -> None:
    cells = memory.KVCells(n_ctx=4096, full=4096, sliding=1024, streams=1)
    assert memory.kv_bytes(KV_LAYERS, cells, "f16", "f16", flash_attn) == expected


def test_kv_bytes_per_type() -> None:
    assert memory.row_bytes("q8_0", 512) == 544 and memory.row_bytes("q4_0", 512) == 288
    assert memory.row_bytes("f16", 512) == 1024


@pytest.mark.parametrize("text, n", [("24GiB", 24 * GiB), ("24GB", 24 * 10**9), ("1024MiB", GiB), ("1.5G", 3 * GiB // 2)])
def test_parse_size(text: str, n: int) -> None:
    assert memory.parse_size(text) == n


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(GgufMtpError, match="expected a size"):
        memory.parse_size("lots")


# --- agreement with llama.cpp -------------------------------------------------------------------------

MATRIX = [
    # variant, target quant, drafter quant, KV type, flash attention, context (the pool), parallel sequences
    ("E2B", "Q4_K_M", "Q8_0", "f16", "auto", 8192, 1),
    ("12B", "Q4_K_M", "Q8_0", "f16", "off", 8192, 1),  # k_eq_v full layers with one 512-wide KV head
    ("31B", "Q4_K_M", "Q8_0", "q8_0", "on", 16384, 1),
    ("26B-A4B", "Q4_K_M", "Q8_0", "f16", "off", 4096, 1),  # V padded to the widest layer, explicit scores
    # N sequences in one unified pool: the sliding cache N windows wide, N x (k + 1) verify rows, the drafter's
    # 9 rows rounded up to 12 (whole rows per sequence)
    ("E2B", "Q4_K_M", "Q8_0", "f16", "auto", 32768, 4),
    ("31B", "Q4_K_M", "Q8_0", "q8_0", "on", 16384, 4),
    ("12B", "Q4_K_M", "Q8_0", "q8_0", "on", 16384, 4),
    ("26B-A4B", "Q4_K_M", "Q8_0", "f16", "off", 16384, 4),
]


@pytest.mark.parametrize("variant, quant, dquant, kv, fa, n_ctx, n_parallel", MATRIX,
                         ids=[f"{m[0]}-np{m[6]}" for m in MATRIX])
def test_planner_matches_llama_cpp(skeletons, variant, quant, dquant, kv, fa, n_ctx, n_parallel) -> None:
    from gguf_mtp.planning.probe import compare_with_llama

    target = skeletons.get(variant, "target", quant)
    drafter = skeletons.get(variant, "drafter", dquant)
    s = RuntimeSettings(n_ctx=n_ctx, cache_type_k=kv, cache_type_v=kv, flash_attn=fa, n_parallel=n_parallel)
    rows = {a.item: a for a in compare_with_llama(target, drafter, s)}
    for item in ("target weights", "drafter weights", "KV cache"):
        assert abs(rows[item].error) <= EXACT, rows[item]
    assert rows["drafter KV cache"].llama == 0  # the drafter views the target's cache
    for item in ("target compute", "drafter compute"):
        a = rows[item]
        assert abs(a.error) <= COMPUTE or abs(a.planner - a.llama) <= SMALL, a


def test_12b_plan_for_16gib_matches_llama_cpp(skeletons) -> None:
    """`plan --variant 12B --quant Q4_K_M --vram 16GiB --vision`: the plan's own settings, loaded by llama.cpp
    (no_alloc) from full-size skeletons, allocate the weights and KV cache the plan counted, within 0.5%."""
    from gguf_mtp.planning.probe import compare_with_llama

    p = search.plan(search.Request(search.files_from_variant("12B", "Q4_K_M", "Q8_0", vision=True), 16 * GiB))
    assert p.fits and p.settings.n_gpu_layers < 0 and p.request.files.mmproj is not None
    rows = {a.item: a for a in compare_with_llama(skeletons.get("12B", "target", "Q4_K_M"),
                                                  skeletons.get("12B", "drafter", "Q8_0"), p.settings)}
    for item in ("target weights", "drafter weights", "KV cache"):
        assert abs(rows[item].error) <= EXACT, rows[item]
    assert rows["KV cache"].llama > 4 * GiB  # the whole 262,144-token context: 8 full layers x 1 KV head x 512


@pytest.mark.parametrize("variant", ["E2B", "12B", "31B"])
def test_projector_matches_libmtmd(skeletons, variant) -> None:
    from gguf_mtp.planning.probe import compare_with_llama

    target = skeletons.get(variant, "target", "Q4_K_M")
    mmproj = skeletons.get(variant, "mmproj")
    rows = {a.item: a for a in compare_with_llama(target, None, RuntimeSettings(n_ctx=4096), mmproj=mmproj)}
    assert abs(rows["projector weights + compute"].error) <= 0.01, rows
    assert abs(rows["projector compute (256-token image)"].error) <= COMPUTE, rows


# --- placement rules ----------------------------------------------------------------------------------

def _items(b: placement.Breakdown, device: str) -> dict[str, int]:
    return {c: n for (d, c), n in b.items.items() if d == device}


def test_amx_repacked_cpu_weights() -> None:
    """On a CPU whose AMX buffer type llama.cpp uses, CPU-resident matmul weights grow by the AMX layout's extra
    bytes per block. Measured there (../shared/notes/cpu.md): E2B Q4_K_M target on the CPU, llama.cpp
    3,755,679,840 bytes vs 3,730,606,176 planned for plain buffers: 25,073,664 more."""
    files = search.files_from_variant("E2B", "Q4_K_M", "Q8_0")
    s = RuntimeSettings(n_ctx=4096, n_gpu_layers=0, drafter_on_gpu=False)
    plain, amx = placement.breakdown(files, s), placement.breakdown(files, s, cpu_amx=True)

    def target_weights(b: placement.Breakdown) -> int:
        return sum(n for (_, c), n in b.items.items() if c.startswith("target") and "buffer" not in c)

    assert target_weights(amx) - target_weights(plain) == 25_073_664
    assert placement.breakdown(files, s.replace(repack=False), cpu_amx=True).items == plain.items  # --no-repack
    on_gpu = RuntimeSettings(n_ctx=4096)  # everything but the input layer on the GPU: AMX changes nothing there
    assert placement.breakdown(files, on_gpu, cpu_amx=True).items == placement.breakdown(files, on_gpu).items


@pytest.mark.parametrize("qtype, shape, expected", [
    ("Q8_0", (2048, 512), 512 * 64 * (34 + 4)),  # 4-byte compensation per 32-block
    ("Q4_K", (2048, 512), 512 * 8 * (144 + 4)),
    ("IQ4_XS", (2048, 512), 512 * 8 * (136 + 2)),
    ("Q6_K", (2048, 512), 512 * 8 * 210),
    ("Q4_K", (2048, 500), None),  # rows not a multiple of 32
    ("Q4_K", (2000, 512), None),  # not whole 256-blocks
    ("Q5_0", (2048, 512), None),  # no AMX kernel
    ("Q8_0", (2048, 512, 8), None),  # MoE experts (MUL_MAT_ID)
])
def test_amx_weight_sizes(qtype, shape, expected) -> None:
    assert memory.amx_weight_bytes(qtype, shape) == expected


def test_input_layer_stays_on_cpu_and_tied_head_is_a_gpu_copy() -> None:
    files = search.files_from_variant("E2B", "Q4_K_M", "Q8_0")
    b = placement.breakdown(files, RuntimeSettings(n_ctx=4096))
    emb = files.target.tensor("token_embd.weight").n_bytes
    ple = files.target.tensor("per_layer_token_embd.weight").n_bytes
    cpu, gpu = _items(b, placement.CPU), _items(b, placement.GPU)
    assert cpu["target embeddings (input)"] == pytest.approx(emb + ple, abs=64)
    assert gpu["target output head"] >= emb  # the tied head: a second copy of token_embd
    d_emb = files.drafter.tensor("token_embd.weight").n_bytes
    assert cpu["drafter embeddings (input)"] == pytest.approx(d_emb, abs=64)
    assert placement.breakdown(files, RuntimeSettings(n_ctx=4096)).cells.sliding == 1024


def test_n_gpu_layers_counts_the_output_layer() -> None:
    layers, out = placement.layer_devices(4, 1)
    assert layers == ["CPU"] * 4 and out == "GPU"
    layers, out = placement.layer_devices(4, 3)
    assert layers == ["CPU", "CPU", "GPU", "GPU"] and out == "GPU"
    assert placement.layer_devices(4, -1) == (["GPU"] * 4, "GPU")


# --- choices ------------------------------------------------------------------------------------------

def test_31b_with_drafter_and_vision_fits_24gb_on_gpu() -> None:
    files = search.files_from_variant("31B", "Q4_K_M", "Q8_0", vision=True)
    p = search.plan(search.Request(files, 24 * GiB, GiB))
    assert p.fits and p.settings.n_gpu_layers == -1 and p.settings.drafter_on_gpu and p.settings.mmproj_on_gpu
    assert p.settings.n_ctx >= 16384
    assert p.gpu_used <= 23 * GiB
    doc = p.to_dict()
    assert doc["runtime"] == p.settings.to_dict()
    assert "--spec-type draft-mtp" in doc["llama_server"] and f"-c {p.settings.n_ctx}" in doc["llama_server"]


def test_moe_experts_go_to_the_cpu_first() -> None:
    files = search.files_from_variant("26B-A4B", "Q4_K_M", "Q8_0")
    p = search.plan(search.Request(files, 12 * GiB, GiB))
    assert p.fits
    assert p.settings.n_cpu_moe > 0 and p.settings.n_gpu_layers == -1
    assert any("offloaded" in c for (d, c) in p.breakdown.items if d == placement.CPU)


def test_fixed_context_and_kv_type() -> None:
    files = search.files_from_variant("E2B", "Q4_K_M", "Q8_0")
    p = search.plan(search.Request(files, 8 * GiB, GiB, n_ctx=32768, kv_type="q8_0"))
    assert p.fits and p.settings.n_ctx == 32768 and p.settings.cache_type_k == "q8_0"
    assert p.settings.flash_attn == "on"  # a quantized V cache needs flash attention
    with pytest.raises(GgufMtpError, match="exceeds the model's context"):
        search.plan(search.Request(files, 8 * GiB, GiB, n_ctx=10**6))


def test_parallel_sequences_share_the_largest_pool_that_fits() -> None:
    """--parallel 4: the context is a pool of 4 equal slots, the KV cache's sliding part 4 windows wide, and the
    pool the largest whole number of 256-cell blocks per slot that fits."""
    files = search.files_from_variant("26B-A4B", "Q4_K_M", "Q8_0")
    req = search.Request(files, 24 * GiB, GiB, base=RuntimeSettings(n_parallel=4))
    p = search.plan(req)
    s = p.settings
    assert p.fits and s.n_parallel == 4 and s.n_ctx % (4 * 256) == 0 and s.slot_ctx * 4 == s.n_ctx
    assert search.MIN_CTX <= s.slot_ctx <= files.target.n_ctx_train and p.gpu_used <= p.budget
    assert p.breakdown.cells.sliding == memory.pad(min(s.n_ctx, files.target.n_swa * 4 + 512), 256)
    assert not search._fits(files, s.replace(n_ctx=s.n_ctx + 4 * 256), req)[0]  # one more block per slot: no
    doc = p.to_dict()
    assert doc["slot_ctx"] == s.slot_ctx and doc["runtime"]["n_parallel"] == 4
    assert doc["contexts"]["target"]["n_seq_max"] == doc["contexts"]["drafter"]["n_seq_max"] == 4
    assert f"-c {s.n_ctx} -np 4 -kvu --kv-unified-per-slot {s.slot_ctx} " in doc["llama_server"]
    assert doc["ollama"]["parameters"]["num_ctx"] == s.slot_ctx
    one = search.plan(search.Request(files, 24 * GiB, GiB))
    assert one.settings.n_parallel == 1 and one.to_dict()["slot_ctx"] == one.settings.n_ctx


def test_one_sequence_needs_no_more_than_a_parallel_plan() -> None:
    """generate/chat run one sequence with a parallel plan's settings (the whole pool for it): the same full cells,
    a narrower sliding window, smaller batches -- never more memory on any device than the plan counted."""
    files = search.files_from_variant("E2B", "Q4_K_M", "Q8_0", vision=True)
    for n in (2, 4, 16):
        s = RuntimeSettings(n_ctx=32768 * n, n_parallel=n)
        many, one = placement.breakdown(files, s), placement.breakdown(files, s.replace(n_parallel=1))
        for (dev, comp), size in one.items.items():
            assert size <= many.items[(dev, comp)], (n, dev, comp)


def test_generate_runs_a_parallel_plan_as_one_sequence(runtime_ggufs, tmp_path) -> None:
    target, drafter = runtime_ggufs["tiny-dense"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runtime": {"n_ctx": 2048, "n_parallel": 4, "flash_attn": "off", "threads": 1}}))
    r = CliRunner().invoke(main, ["generate", "--target", str(target), "--drafter", str(drafter), "--plan", str(plan),
                                  "-p", "the cat", "-n", "8", "--draft-max", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stats"]["tokens"] > 0


def test_too_small_a_budget_says_by_how_much() -> None:
    files = search.files_from_variant("31B", "Q4_K_M", "Q8_0")
    p = search.plan(search.Request(files, 2 * GiB, GiB, ram=4 * GiB))
    assert not p.fits and p.shortfall > 0
    msg = search.shortfall_message(p)
    assert msg.startswith("does not fit") and "short" in msg


@pytest.mark.parametrize("kv, fa", [("f32", "auto"), ("bf16", "auto"), ("f16", "auto"), ("q8_0", "on")])
def test_a_plan_that_does_not_fit_keeps_flash_attention_as_its_cache_needs(kv, fa) -> None:
    """Only a quantized cache turns flash attention on, in the plan that fits and in the closest miss alike."""
    files = search.files_from_variant("31B", "Q4_K_M", "Q8_0")
    p = search.plan(search.Request(files, 2 * GiB, GiB, ram=4 * GiB, kv_type=kv))
    assert not p.fits and (p.settings.cache_type_k, p.settings.flash_attn) == (kv, fa)


# --- the command ----------------------------------------------------------------------------------------

def test_plan_cli_json_roundtrip(tmp_path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["plan", "--variant", "E2B", "--quant", "Q4_K_M", "--vram", "8GiB", "-o", str(out),
                                  "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["fits"] and doc["runtime"] == json.loads(out.read_text())["runtime"]
    assert load_plan_settings(out).to_dict() == doc["runtime"]
    assert doc["devices"]["GPU"]["total"] <= doc["devices"]["GPU"]["budget"]


def test_plan_cli_parallel() -> None:
    r = CliRunner().invoke(main, ["plan", "--variant", "26B-A4B", "--quant", "Q4_K_M", "--parallel", "4", "--vram",
                                  "24GiB", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["fits"] and doc["slot_ctx"] * 4 == doc["runtime"]["n_ctx"] and doc["runtime"]["n_parallel"] == 4
    assert doc["devices"]["GPU"]["total"] <= doc["devices"]["GPU"]["budget"]
    r = CliRunner().invoke(main, ["plan", "--variant", "26B-A4B", "--quant", "Q4_K_M", "-np", "4"])
    assert r.exit_code == 0, r.output
    assert f"tokens shared by 4 sequences ({doc['slot_ctx']} each)" in r.output
    assert "# 4 parallel sequences (server-wide)" in r.output  # what a Modelfile cannot say


def test_plan_cli_table(skeletons) -> None:
    r = CliRunner().invoke(main, ["plan", "--target", str(skeletons.get("E2B", "target", "Q4_K_M")),
                                  "--drafter", str(skeletons.get("E2B", "drafter", "Q8_0")), "--vram", "6GiB"])
    assert r.exit_code == 0, r.output
    assert "KV cache" in r.output and "llama-server" in r.output and "num_ctx" in r.output


@pytest.mark.parametrize("args, code, text", [
    (["--variant", "E9B"], 2, "unknown model variant"),
    (["--variant", "E2B", "--quant", "Q9_K"], 2, "Q9_K"),
    (["--variant", "31B", "--vram", "2GiB"], 2, "does not fit"),
    (["--variant", "31B", "--vram", "1GiB"], 2, "must be larger than --margin"),
    (["--variant", "E2B", "--ctx", "1000000"], 2, "exceeds"),
    (["--variant", "E2B", "--parallel", "4", "--ctx", "600000"], 2, "(150000 for each of 4 sequences) exceeds"),
    (["--variant", "E2B", "--parallel", "0"], 2, "--parallel"),
    ([], 2, "either --target"),
])
def test_plan_cli_bad_input(args, code, text) -> None:
    r = CliRunner().invoke(main, ["plan", *args])
    assert r.exit_code == code and text in r.output, r.output


def test_plan_cli_refuses_a_mismatched_drafter(skeletons) -> None:
    r = CliRunner().invoke(main, ["plan", "--target", str(skeletons.get("E2B", "target", "Q4_K_M")),
                                  "--drafter", str(skeletons.get("31B", "drafter", "Q8_0"))])
    assert r.exit_code == 1 and "hidden_size" in r.output, r.output


# --- several devices (split mode layer) ---------------------------------------------------------------------------


@pytest.mark.parametrize("ts, act, expected", [
    ([48.0, 13.0], 61, [48, 13]),  # whole-layer counts put exactly those counts on the devices
    ([3.0, 1.0], 61, [46, 15]),  # llama.cpp's upper_bound on float32 split points: 45.75 -> 46
    ([1.0, 0.0, 1.0], 10, [5, 0, 5]),  # a zero proportion gets no layers
    ([], 7, [4, 3]),  # no proportions: even here (llama.cpp would split by free memory)
])
def test_split_follows_llama_cpps_rule(ts, act, expected):
    n_dev = len(expected)
    splits = split_points(ts, n_dev)
    counts = [0] * n_dev
    for i in range(act):
        counts[split_device(splits, i, act)] += 1
    assert counts == expected


def test_layer_devices_with_partial_offload_and_a_split():
    layers, out = layer_devices(10, 6, ["CUDA0", "CUDA1"], [2.0, 4.0])
    assert layers == ["CPU"] * 5 + ["CUDA0"] * 2 + ["CUDA1"] * 3 and out == "CUDA1"


@pytest.fixture(scope="module")
def split_plans():
    files = search.files_from_variant("31B", "Q4_K_M", "Q8_0", vision=True)
    one = search.plan(search.Request(files, 24 * GiB))
    two = search.plan(search.Request(files, devices=devices_from([24 * GiB, 12 * GiB])))
    rpc = search.plan(search.Request(files, devices=devices_from([24 * GiB], [("10.0.0.2:50052", 24 * GiB)])))
    return files, one, two, rpc


def test_split_plan_proportions_drafter_and_totals(split_plans):
    files, one, two, rpc = split_plans
    s, b = two.settings, two.breakdown
    assert two.fits and s.devices == ["CUDA0", "CUDA1"] and s.drafter_device == "CUDA1"
    assert [b.layers[d] for d in s.devices] == [int(x) for x in s.tensor_split]
    assert sum(s.tensor_split) == files.target.n_layer + 1  # the output layer counts as one
    assert s.tensor_split[0] > s.tensor_split[1]  # the bigger card takes more layers
    # the drafter, the projector and the output head sit with the target's last layers
    for comp in ("drafter layers", "drafter compute buffer", "projector weights", "target output head"):
        assert b.items.get(("CUDA1", comp)) and not b.items.get(("CUDA0", comp))
    doc = two.to_dict()
    for dev, budget in two.request.budgets().items():
        entry = doc["devices"][dev]
        assert entry["total"] == sum(entry["components"].values()) == b.on(dev) <= budget
    assert sum(e["total"] for e in doc["devices"].values()) == sum(b.items.values())
    assert rpc.settings.devices == ["RPC0", "CUDA0"] and rpc.settings.rpc == ["10.0.0.2:50052"]
    assert rpc.settings.drafter_device == "CUDA0"  # local: the rpc-server's layers come first


def test_a_second_device_grows_the_context(split_plans):
    _, one, two, rpc = split_plans
    assert one.settings.n_ctx < two.settings.n_ctx <= rpc.settings.n_ctx


def test_a_device_too_small_gets_no_layers():
    files = search.files_from_variant("26B-A4B", "Q4_K_M", "Q8_0")
    p = search.plan(search.Request(files, devices=devices_from([24 * GiB, 1 * GiB + 64 * 1024 * 1024, 24 * GiB])))
    assert p.fits and p.settings.devices == ["CUDA0", "CUDA2"]
    assert "CUDA1" not in p.breakdown.layers


def test_one_gpu_plan_files_keep_their_keys():
    d = RuntimeSettings().to_dict()
    assert not {"rpc", "devices", "tensor_split", "drafter_device"} & set(d)
    s = RuntimeSettings(devices=["CUDA0", "CUDA1"], tensor_split=[2.0, 1.0], drafter_device="CUDA1")
    assert RuntimeSettings.from_dict(s.to_dict()) == s
    with pytest.raises(GgufMtpError, match="tensor_split"):
        RuntimeSettings(devices=["CUDA0"], tensor_split=[1.0, 2.0])

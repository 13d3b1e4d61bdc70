"""Launch configurations of the Triton sampling kernels, all in one place.

As for the loss kernels (loss/triton/configs.py): a fixed default per operand width,
chosen for H100 (sm_90) bf16 and sized to fit an A100's shared memory and the register
file, candidates that `DISTIL_KERNELS_AUTOTUNE=1` times on the first launch of a shape
bin, and small tiles under the interpreter. The ahead-of-time compile tests build every
config listed here for sm_90 and sm_80.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...loss.triton.configs import TileConfig, autotuning, fastest, interpreting, shape_bin, tensor_descriptors

# Largest k of the top-k kernel: each row keeps K int64 keys in registers next to a
# sorted [BLOCK_M, BLOCK_N >= K] key tile; beyond 256 they would spill (see below).
MAX_TOPK = 256

# Samples drawn per program from one logits tile. A sample's noise is about 75
# instructions per id (a quarter of a Philox call, an accurate and a fast fp32 log), by
# instruction counts half the time of the tile's matmul at d = 4096 on an H100, so more
# samples per program would save little matmul; a grid axis over groups of samples
# keeps the GPU full at small batch sizes.
SAMPLES_PER_PROGRAM = 4

# Enough programs to cover the SMs of an H100 (132) a few times over.
TARGET_PROGRAMS = 4 * 132

# Registers bound these tiles, not shared memory. As the JIT specialises a contiguous,
# 16-aligned launch, ptxas (CUDA 12.8) fits every config below in 255 registers per
# thread on sm_90 and sm_80, spilling at most 8 bytes for bf16 and 24 for fp32
# (tests/sampling/test_triton_sampling_aot.py reports each); one more key or noise
# value per thread spills hundreds. The merge top-k (the threshold pass's fallback for
# the rows it cannot settle): a [BLOCK_M, BLOCK_N] int64 key tile, its sorted copy and
# the running keys take 8 bytes per entry, so a thread holds 16 tile entries (64x64 or
# 16x256 over 8 warps). K <= 64 fits a 64-row block (one wgmma M); K up to 256 needs
# BLOCK_N = 256 and so 16 rows, where 32-wide K slices leave room for a fourth stage.
# One config each: a fallback that sees few rows is not worth tuning, nor the minutes
# its alternates took to compile in CI for every K.
TOPK_SMALL_K = TileConfig(64, 64, 64, num_warps=8, num_stages=3)  # K <= 64
TOPK_LARGE_K = TileConfig(16, 256, 32, num_warps=8, num_stages=4)  # 64 < K <= 256
# fp32 operands take twice the registers and shared memory per K slice: 32-wide slices
# for the 64-wide tile, 16-wide ones for the 256-wide tile (with 32 it spilled 40 B on
# sm_80 under Triton 3.9; 16 spills 0-24 B under 3.6 and 3.9).
TOPK_SMALL_K_FP32 = TileConfig(64, 64, 32, num_warps=8, num_stages=3)
TOPK_LARGE_K_FP32 = TileConfig(16, 256, 16, num_warps=8, num_stages=3)

# Threshold top-k: the loss forward's work (a GEMM with an online log-sum-exp), plus a
# compare per entry and a few rounds of row maxima that take the entries at or above
# the bound (a quarter of one per row in a 128-wide tile, so two rounds in most
# tiles, three in a fifth of them: each round ~400 instructions a thread). Its GEMM
# reads x and W slices from L2 for each tile: 2 BLOCK_M BLOCK_N / (BLOCK_M + BLOCK_N)
# FLOPs per byte, 64 for 128x128 and 43 for 64x128 (the loss forward's 128x128 TMA tile
# read them at 8.3 TB/s on an H100). The rounds' masked copy of the tile is live next
# to the logits: with softcap, bias and the raw lse, 128x128 over 8 warps spills 16-32 B
# on sm_90 (255 registers, Triton 3.6 and 3.9) but 160-320 B on sm_80, where 64x128 fits
# (229-255 registers, no spill). So sm_90 gets 128x128 and sm_80 64x128. fp32 operands
# hold their K slices in registers too: 64x64 over 8 warps (180-190 registers, no spill;
# 32x128 spills up to 40 B where ptxas caps it at 128 registers).
THRESHOLD_DEFAULT_SM90 = TileConfig(128, 128, 64, num_warps=8, num_stages=3)
# With TMA descriptors for the x and W slices (no masks or per-thread addresses) the
# same tile spills 8 B instead of 24 in 6% fewer instructions (Triton 3.6), and on an
# H100 (`python -m bench tune`, seventh session; N=2048, Qwen2.5-7B's head) took 7.63 ms
# against 8.15 by pointers: it leads where Triton has descriptors. Since its candidates
# are stored as one int64 key a round (eighth session), the spec with softcap, bias and
# the raw lse takes 199 registers by TMA and spills nothing (255 and 16 B by pointers;
# Triton 3.9).
THRESHOLD_TMA_SM90 = TileConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True)
# The same tile in one loop over (tile, K slice), the epilogue in the branch of a tile's
# last slice: the pipeliner issues the next tile's first slices before the epilogue
# (TTGIR), so each tile's GEMM starts on loaded operands instead of waiting out the
# latency of its first loads, a few percent of a 128x128x3584 tile's ~28k cycles on an
# H100. 184-187 registers, no spill.
THRESHOLD_TMA_FLAT_SM90 = TileConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True, flat=True)
# Two adjacent 128-wide tiles a pass over the rows' x slices (`wide_tiles`): per 256
# columns the pass reads one x slice from L2 instead of two, (128 + 256) d bytes
# instead of 2 (128 + 128) d, a quarter less, and half the passes' pipeline fills. The
# 128x256 loss forward tile was 1.22x faster on an H100 than 128x128, but the threshold
# call at N=2048 (7.63 ms) read its tiles' slices at no more than 4.6 TB/s where the
# loss forward's 128x128 TMA tile read 8.3: its time goes elsewhere (bench/RESULTS.md,
# tenth session), so what this saves is for the tune step to say.
# The second tile's accumulator stays live through the first one's epilogue: 254-255
# registers, no spill for a plain head, 24 B with softcap, bias and the raw lse
# (Triton 3.9); four stages or the flat loop spill 40-96 B.
THRESHOLD_TMA_PAIR_SM90 = TileConfig(128, 128, 64, num_warps=8, num_stages=3, split_n=2, tma=True)
THRESHOLD_CANDIDATES_SM90 = (*((THRESHOLD_TMA_SM90, THRESHOLD_TMA_FLAT_SM90, THRESHOLD_TMA_PAIR_SM90)
                               if tensor_descriptors() is not None else ()),
                             THRESHOLD_DEFAULT_SM90, TileConfig(64, 256, 64, num_warps=8, num_stages=3),
                             TileConfig(64, 128, 64, num_warps=8, num_stages=4))
# A plain head (no bias or softcap, no raw lse: Llama's and Qwen's heads) has candidates
# of its own. The threshold pass's epilogue is long: over 8 warps a 128x128 tile takes
# ~2000 instructions a thread against the loss forward's ~750 (sm_90 SASS: ~1150 before
# the rounds, then ~400 a round, about two rounds a tile at k=64), and at 183-199
# registers a program holds its SM alone, so the tensor cores wait out every epilogue.
# Over one warpgroup the same tile takes 255 registers with no spill for a plain head
# (Triton 3.6 and 3.9; with bias, softcap and the raw lse it spills 0.9-2.2 KB) and
# 96 KiB of shared memory: two programs an SM, so that one's epilogue runs beside the
# other's products, as cuBLAS's ping-pong kernels alternate two warpgroups.
THRESHOLD_TMA_WARPGROUP_SM90 = TileConfig(128, 128, 64, num_warps=4, num_stages=3, tma=True)
# The pair's two tiles share each x slice, but with both wgmma operands in shared memory
# each of its m64n128k16 wgmmas reads the slice again: per 16-wide K step 24 KiB of reads
# and 12 KiB of TMA writes for 0.5M multiply-adds, ~280 cycles at 128 B a cycle an SM
# against the tensor cores' 256. With the slice read into registers once (`wide_tiles`),
# 20 KiB of reads. (By the same count the single 128x128 tile's 20 KiB against 128
# cycles of products cap it near 80% of the 128x256 tile's rate, as the seventh
# session's loss forward rows measured: 8.37 against 6.84 ms.) For a plain head 255
# registers and no spill, 128 KiB (Triton 3.9); with every option on it spills 40 B, so
# it is a plain candidate.
THRESHOLD_TMA_PAIR_XREG_SM90 = TileConfig(128, 128, 64, num_warps=8, num_stages=3, split_n=2, tma=True,
                                          x_registers=True)
# 256 rows over 8 warps: each warpgroup's two m64n128k16 wgmmas a K step share W's slice,
# and the pass reads (256 + 128) d bytes of L2 for 256 x 128 outputs, as the pair does for
# 128 x 256. For a plain head 255 registers and no spill (Triton 3.6 and 3.9), 144 KiB;
# with every option on it spills 1-2 KB. Its candidate rounds take the largest hit
# count of 256 rows: ~2.4 a tile at k=64 against ~2.2 for 128 rows, for twice the
# rows.
THRESHOLD_TMA_TALL_SM90 = TileConfig(256, 128, 64, num_warps=8, num_stages=3, tma=True)
# Timed on an H100 (`python -m bench tune`, twelfth session; k=64, N=2048, Qwen2.5-7B's
# plain head, against the bare matmul's 3.30 ms): the pair 4.88 ms, the pair with x from
# registers 5.07, the single TMA tile 5.85, its flat loop 5.82, one warpgroup 6.03, the
# 256-row tile 6.80, 64x256 by pointers 6.82. So the pair leads for a plain head; with
# every option on (24 B spilled) it stays a candidate until a tune row on such a head.
THRESHOLD_PLAIN_CANDIDATES_SM90 = (*((THRESHOLD_TMA_PAIR_SM90,) if tensor_descriptors() is not None else ()),
                                   *(c for c in THRESHOLD_CANDIDATES_SM90 if c != THRESHOLD_TMA_PAIR_SM90),
                                   *((THRESHOLD_TMA_WARPGROUP_SM90, THRESHOLD_TMA_PAIR_XREG_SM90,
                                      THRESHOLD_TMA_TALL_SM90) if tensor_descriptors() is not None else ()))
THRESHOLD_DEFAULT = TileConfig(64, 128, 64, num_warps=8, num_stages=4)
THRESHOLD_CANDIDATES = (THRESHOLD_DEFAULT,)
THRESHOLD_DEFAULT_FP32 = TileConfig(64, 64, 32, num_warps=8, num_stages=3)

# Sampling: the noise of a tile (Philox on a quarter of it, then two logs per entry) is
# live next to the fp32 logits, which leaves room for 8 tile entries per thread: 64x32
# over 8 warps (64x64 fills all 255 registers and spills). But a program that holds
# every row of a small batch re-reads their x from L2 for each tile, and with 32-wide
# tiles that is twice the bytes of W the tile streams: at B=64 on Qwen2.5-7B's head
# 2.2 GB of x against 1.1 GB of W, which took 3x the bare matmul's time on an H100
# (bench/RESULTS.md). So `split_n` adjacent tiles share each pass over x, each its own
# accumulator whose noise the epilogue takes in turn: 4 on sm_90 (x traffic halved
# twice; 228-234 registers, no spill under Triton 3.6 and 3.9), 2 on sm_80 (where 4
# spills 24-32 B). Below 16 rows a 16x128 block, 2 tiles per pass. Consecutive
# programs are row blocks of the same split, so at larger batches they read each W
# tile at about the same time and share it through L2. fp32 keeps one tile per pass
# (its FMA loop holds the K slices in registers).
# At B=64 the sampler streams the head from HBM like a GEMV: 128-wide K slices read 256
# contiguous bytes of each W row per stage instead of 128, in half the loop steps (239-255
# registers, no spill under Triton 3.6 and 3.9; 144 KiB of shared memory). Timed on an
# H100 (`python -m bench tune`, seventh session, two runs; Qwen2.5-7B's head): 0.525 ms at B=64 and 1.44-1.51
# at B=256 against 0.59 and 1.59-1.63 for 64-wide slices; the fastest at B=256 and within
# 2% of the fastest (the 4-stage TMA one below) at B=64, with no need for descriptors:
# an autotuning candidate beside them (below for the Tritons that have none).
SAMPLE_DEFAULT_SM90 = TileConfig(64, 32, 128, num_warps=8, num_stages=3, split_n=4)
SAMPLE_DEFAULT = TileConfig(64, 32, 64, num_warps=8, num_stages=3, split_n=2)
SAMPLE_SMALL_BATCH = TileConfig(16, 128, 64, num_warps=8, num_stages=3, split_n=2)
# With TMA descriptors W streams in [32, BLOCK_K] boxes, one instruction each instead of
# per-thread masked loads (177-221 registers instead of 204-224, Triton 3.6); the
# 4-stage 128-wide one keeps 192 KiB of W in flight an SM (0.514 ms at B=64, 1.497 at
# B=256; 64-wide slices by TMA 0.598 and 1.663).
# The flat ones run a program's passes as one loop over (pass, K slice) (`flat_passes`).
# A program holds its SM alone (163-167 registers over 8 warps; 152-200 KiB of shared
# memory), so with a loop per pass HBM idles while a pass's epilogue computes its noise,
# about 5000 instructions a thread on sm_90 when timed (greedy draws: 1200; ~4100 since
# the fast outer log and the winners' logits recomputed after the pass): by instruction counts
# ~15% of the pass, as the 1.32x of the bare matmul against greedy's 1.08x suggests. In
# one loop the pipeliner issues the next pass's first `num_stages - 1` slices (48 KiB
# each) before the epilogue, whose time their loads then fill (TTGIR: the TMA copies of
# iteration i + stages - 1 precede the epilogue's branch). Over 8 warps a 64-row tile
# is two warpgroups side by side, so each of a tile's row reductions crosses warps
# through shared memory (about 18 barriers a tile at one sample, Triton 3.9); over 4
# warps one warpgroup holds whole rows and reduces them by shuffles (1 barrier a
# sample), and the flat 64-wide-slice tile fits in 255 registers (spilling 8-32 B at 2-4
# samples a program) and 104 KiB, so two programs share an SM, each one's epilogue
# beside the other's loads.
# x slices from registers (`x_registers`, the wgmmas' RS form: `wide_tiles` says why):
# each 8-warp tile above issues m64n16k16 wgmmas that re-read their 2 KiB x slice from
# shared memory beside 0.5 KiB of W, 2.5x the bytes of the same products with x read
# into registers once a K slice; over 4 warps (m64n32k16) 2x. The copies of the timed
# 4-stage TMA tile, the flat one and the 4-warp one: 150-165 registers over 8 warps and
# 246-255 over 4 (no spill at one sample, 8 B at four), and 16 KiB less shared memory,
# as x no longer waits in a buffer of its own for the epilogue (Triton 3.9, sm_90). And
# since the noise's outer log is the fast one and the winners' logits are recomputed
# after the pass, a 64x64 tile's noise fits 8 warps (235-239 registers, no spill, 144
# KiB): its wgmmas are m64n32k16, and a pass of two such tiles has half the row
# reductions of four 32-wide ones (52 barriers a pass against 98).
# Timed on an H100 (`python -m bench tune`, twelfth session; Qwen2.5-7B's head, T=0.8;
# bench/RESULTS.md): at B=64, a single 64-row block that streams the head from HBM, the
# 64x64 tile with x from registers took 0.442 ms (1.09x the bare matmul's 0.404), the
# 4-stage flat tile 0.447, the 4-warp flat one 0.461, the pointer default above 0.484.
# At B=256 (four row blocks; the matmul 0.455 ms) the 4-warp flat tile took 0.891 ms
# against 1.26-1.43 for the 8-warp ones: two of its programs share an SM, one's noise
# beside the other's products, and with four times B=64's noise that overlap is what
# counts. With x from registers the same 4-warp tile took 1.225, and the tall tiles below
# 1.015 (by shared memory) and 1.344. So where Triton has descriptors the 64x64 tile
# leads for batches of one row block and the 4-warp flat tile for larger ones.
SAMPLE_WIDE_XREG_SM90 = TileConfig(64, 64, 128, num_warps=8, num_stages=3, split_n=2, tma=True, flat=True,
                                   x_registers=True)
# Yet ptxas serializes the wgmmas of every flat tile with x from registers: Triton leaves
# a K slice's RS wgmmas in flight across the loop's back edge, where the pass's epilogue
# and the accumulators' reset sit, so ptxas waits out each wgmma before the next (SASS: a
# `WARPGROUP.DEPBAR.LE gsb0, 0x0` after each of the 16 HGMMAs, against 7 waits for the
# same 4-warp tile by shared memory, whose K slice ends in one wait for all). CUDA 12.8's
# ptxas (Triton 3.6) says so in its info C7515, "non wgmma instructions defining
# accumulator registers of a wgmma between start and end of the pipeline stage"; under
# Triton 3.9 the K loop per pass with x from registers is serialized too, here and in
# the threshold pass's `-xreg` pair. Triton 3.6 and 3.9 run the accumulator-init pass,
# which would make the reset the wgmma's own flag, from sm_100 only. (`aot.serialized_wgmmas`
# reads this from the SASS; the AOT tests apply it to every tile whose wgmmas read shared
# memory alone.) That the 64x64 tile won at B=64 anyway (HBM-bound), and the 4-warp and
# tall copies lost at B=256, fits. Two 64x64 tiles that keep the wgmmas pipelined (on the
# GPU machine's Triton 3.6): the flat loop by shared memory (239-253 registers, no spill,
# 160 KiB), and x from registers with a K loop per pass (240-255, spilling 0-32 B at four
# samples, 128 KiB). Not timed yet.
SAMPLE_WIDE_FLAT_SM90 = TileConfig(64, 64, 128, num_warps=8, num_stages=3, split_n=2, tma=True, flat=True)
SAMPLE_WIDE_PASSES_XREG_SM90 = TileConfig(64, 64, 128, num_warps=8, num_stages=3, split_n=2, tma=True,
                                          x_registers=True)
SAMPLE_WARPGROUP_FLAT_SM90 = TileConfig(64, 32, 64, num_warps=4, num_stages=4, split_n=4, tma=True, flat=True)
SAMPLE_ONE_BLOCK_ROWS = 64
SAMPLE_TMA_SM90 = (TileConfig(64, 32, 64, num_warps=8, num_stages=3, split_n=4, tma=True),
                   TileConfig(64, 32, 128, num_warps=8, num_stages=4, split_n=4, tma=True),
                   TileConfig(64, 32, 128, num_warps=8, num_stages=4, split_n=4, tma=True, flat=True),
                   TileConfig(64, 32, 128, num_warps=8, num_stages=3, split_n=4, tma=True, flat=True),
                   SAMPLE_WARPGROUP_FLAT_SM90,
                   TileConfig(64, 32, 128, num_warps=8, num_stages=4, split_n=4, tma=True, x_registers=True),
                   TileConfig(64, 32, 128, num_warps=8, num_stages=3, split_n=4, tma=True, flat=True,
                              x_registers=True),
                   TileConfig(64, 32, 64, num_warps=4, num_stages=4, split_n=4, tma=True, flat=True,
                              x_registers=True),
                   SAMPLE_WIDE_XREG_SM90, SAMPLE_WIDE_FLAT_SM90, SAMPLE_WIDE_PASSES_XREG_SM90)
# Without descriptors (Triton 3.2 and 3.3, where these lead) the 128-wide K slices spill
# 96-112 B a thread (Triton 3.2's ptxas, 255 registers) where 64-wide ones fit (224-237
# registers, no spill): there the 64-wide tile leads and the 128-wide one is left out.
SAMPLE_NARROW_K_SM90 = TileConfig(64, 32, 64, num_warps=8, num_stages=3, split_n=4)
SAMPLE_CANDIDATES_SM90 = (*((SAMPLE_DEFAULT_SM90,) if tensor_descriptors() is not None else ()), SAMPLE_NARROW_K_SM90,
                          SAMPLE_DEFAULT, TileConfig(64, 32, 64, num_warps=8, num_stages=3),
                          *(SAMPLE_TMA_SM90 if tensor_descriptors() is not None else ()))
# Above 64 rows each pass's W tiles are read from L2 by every row block, and its x rows
# by every pass: per output, 1 / (split_n block_n) + 1 / block_m of a bf16 operand row,
# which at B=256 (1.44-1.51 ms against the bare matmul's 0.45) is about 6.5 GB of L2
# reads for 64-row blocks. 128 rows over 8 warps are two warpgroups stacked, each
# holding whole rows (reductions by shuffles, as 4 warps over 64 rows), in 255 registers
# (spilling 0-24 B at 1-4 samples) and 112 KiB: two thirds of the L2 reads. Below 128
# rows the extra rows would be noise for nothing.
SAMPLE_TALL_TMA_SM90 = TileConfig(128, 32, 64, num_warps=8, num_stages=3, split_n=4, tma=True, flat=True)
# Its m64n32k16 wgmmas read 3 KiB of shared memory each; with x from registers, 1 KiB
# and a 16 KiB x slice a K slice (251 registers, no spill at one sample).
SAMPLE_TALL_XREG_SM90 = TileConfig(128, 32, 64, num_warps=8, num_stages=3, split_n=4, tma=True, flat=True,
                                   x_registers=True)
SAMPLE_CANDIDATES = (SAMPLE_DEFAULT, TileConfig(64, 32, 64, num_warps=8, num_stages=3))
SAMPLE_DEFAULT_FP32 = TileConfig(64, 32, 32, num_warps=8, num_stages=3)
# 16-wide K slices: the FMA loop's slices of 32 with several samples' noise spilled 24-40 B
# on sm_90 under Triton 3.9 (246-255 registers, no spill, under 3.6 and 3.9 now).
SAMPLE_SMALL_BATCH_FP32 = TileConfig(16, 128, 16, num_warps=8, num_stages=3)

# The truncated sampler's dense fallback draws over logits loaded from memory (no matmul:
# block_k is unused), a program 4 rows by 512 ids: 16 entries a thread over 4 warps
# with their noise and the kept set's mask, 128-215 registers as a 16-aligned vocabulary
# launches it (16-byte loads), no spill but 8 B on sm_80 at two samples under Triton 3.9
# (16 x 128 took 220-255).
DENSE_SAMPLE_CONFIG = TileConfig(4, 512, 1, num_warps=4, num_stages=2)
# The truncation kernel (`truncation.py`): a program per row, ~20 passes over it (the
# nucleus search), each an fp32 exp, a compare and float64 add per id. A batch of 64 rows
# is one program on each of 64 SMs, whose loads wait out the L2's latency (~600 cycles)
# with nothing else to run: what a step keeps in flight bounds its rate (8 KiB over 8
# warps, ~14 B a cycle; 16 KiB over 16). 4096 ids a step over 16 warps is 8 a thread in
# two 16-byte loads (vocabularies and row strides that are multiples of 16, as model
# heads' are), with no reduction across warps until a pass ends: 80-120 registers and
# no spill on sm_90 and sm_80 (Triton 3.6 and 3.9). Loads do not pipeline here (no
# shared memory), and an unrolled loop (`loop_unroll_factor`) left ptxas reusing one
# pair of registers for every load.
TRUNCATION_CONFIG = TileConfig(1, 4096, 1, num_warps=16, num_stages=1)
# Sampling among each row's top candidates (256 of them unless top_k asks for more): a
# program a row, 256 candidates a chunk (block_n) over 4 warps, one Philox call an id.
CANDIDATE_SAMPLE_CONFIG = TileConfig(1, 256, 1, num_warps=4, num_stages=1)

# Under TRITON_INTERPRET=1 each program runs on the CPU, one numpy op at a time: small
# tiles so that test shapes span several tiles per split and several splits.
INTERPRETER_TOPK_CONFIG = TileConfig(16, 64, 32, num_warps=1, num_stages=1)
INTERPRETER_TOPK_LARGE_K_CONFIG = TileConfig(16, 256, 32, num_warps=1, num_stages=1)
# The sampler's takes 2 tiles per pass over x, as the GPU defaults do.
INTERPRETER_SAMPLE_CONFIG = TileConfig(16, 32, 32, num_warps=1, num_stages=1, split_n=2)
INTERPRETER_THRESHOLD_CONFIG = TileConfig(16, 64, 32, num_warps=1, num_stages=1)
INTERPRETER_DENSE_SAMPLE_CONFIG = TileConfig(4, 32, 1, num_warps=1, num_stages=1)
INTERPRETER_CANDIDATE_SAMPLE_CONFIG = TileConfig(1, 32, 1, num_warps=1, num_stages=1)
INTERPRETER_TRUNCATION_CONFIG = TileConfig(1, 32, 1, num_warps=1, num_stages=1)
INTERPRETER_TARGET_PROGRAMS = 6


# The sampler writes 28 B of partials per (row, split) at one sample (a score and an id,
# then two (max, sum-exp) pairs) and few rows fill nothing: at B=64 and V=152064, 4
# programs per SM would mean 528 splits and 0.90 MiB of partials for one token per row.
# Two per SM halve that (0.45 MiB): resident together where a
# program's registers and shared memory leave room for two (the 4-warp flat tile), else
# in two waves of one an SM, each program streaming its splits with its loads pipelined.
# `plan_splits` deals the passes out so that each SM's two programs add up to the same
# work (5 + 4 of 1188 passes at B=64).
SAMPLE_TARGET_PROGRAMS = 2 * 132


def target_programs(kind: str = "topk") -> int:
    if interpreting():
        return INTERPRETER_TARGET_PROGRAMS
    return SAMPLE_TARGET_PROGRAMS if kind == "sample" else TARGET_PROGRAMS


def topk_candidates(dtype: torch.dtype, K: int) -> tuple[TileConfig, ...]:
    """Configs for `K` kept keys, the default first; every one has BLOCK_N >= K."""
    if K <= TOPK_SMALL_K.block_n:
        return (TOPK_SMALL_K_FP32 if dtype == torch.float32 else TOPK_SMALL_K,)
    return (TOPK_LARGE_K_FP32 if dtype == torch.float32 else TOPK_LARGE_K,)


def threshold_candidates(dtype: torch.dtype, arch: int, plain: bool = False) -> tuple[TileConfig, ...]:
    """Configs for compute capability `arch` (90 for sm_90), the default first; `plain`: a
    head with no bias or softcap whose raw lse is not asked for."""
    if dtype == torch.float32:
        return (THRESHOLD_DEFAULT_FP32,)
    if arch < 90:
        return THRESHOLD_CANDIDATES
    return THRESHOLD_PLAIN_CANDIDATES_SM90 if plain else THRESHOLD_CANDIDATES_SM90


def sample_candidates(dtype: torch.dtype, rows: int, arch: int) -> tuple[TileConfig, ...]:
    """Configs for `rows` rows on compute capability `arch` (90 for sm_90), the default first."""
    if dtype == torch.float32:
        return (SAMPLE_SMALL_BATCH_FP32 if rows <= 16 else SAMPLE_DEFAULT_FP32,)
    if rows <= 16:
        return (SAMPLE_SMALL_BATCH,)
    if arch < 90:
        return SAMPLE_CANDIDATES
    if tensor_descriptors() is None:
        return SAMPLE_CANDIDATES_SM90
    lead = SAMPLE_WIDE_XREG_SM90 if rows <= SAMPLE_ONE_BLOCK_ROWS else SAMPLE_WARPGROUP_FLAT_SM90
    tall = (SAMPLE_TALL_TMA_SM90, SAMPLE_TALL_XREG_SM90) if rows >= 128 else ()
    return (lead, *(c for c in SAMPLE_CANDIDATES_SM90 if c != lead), *tall)


def device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


_TUNED: dict[tuple, TileConfig] = {}


def _pick(key: tuple, candidates: tuple[TileConfig, ...], run: Callable[[TileConfig], object] | None) -> TileConfig:
    if not autotuning() or run is None or len(candidates) == 1:
        return candidates[0]
    if key not in _TUNED:
        _TUNED[key] = fastest(candidates, run)
    return _TUNED[key]


def select_topk_config(dtype: torch.dtype, K: int, rows: int, vocab: int,
                       run: Callable[[TileConfig], object] | None = None) -> TileConfig:
    if interpreting():
        return INTERPRETER_TOPK_CONFIG if K <= INTERPRETER_TOPK_CONFIG.block_n else INTERPRETER_TOPK_LARGE_K_CONFIG
    return _pick(("topk", dtype, K, shape_bin(rows), vocab), topk_candidates(dtype, K), run)


def select_sample_config(dtype: torch.dtype, rows: int, vocab: int, device: torch.device,
                         run: Callable[[TileConfig], object] | None = None) -> TileConfig:
    if interpreting():
        return INTERPRETER_SAMPLE_CONFIG
    arch = device_arch(device)
    return _pick(("sample", dtype, shape_bin(rows), vocab, arch), sample_candidates(dtype, rows, arch), run)


def select_dense_sample_config() -> TileConfig:
    return INTERPRETER_DENSE_SAMPLE_CONFIG if interpreting() else DENSE_SAMPLE_CONFIG


def select_truncation_config() -> TileConfig:
    return INTERPRETER_TRUNCATION_CONFIG if interpreting() else TRUNCATION_CONFIG


def select_candidate_sample_config() -> TileConfig:
    return INTERPRETER_CANDIDATE_SAMPLE_CONFIG if interpreting() else CANDIDATE_SAMPLE_CONFIG


def select_threshold_config(dtype: torch.dtype, rows: int, vocab: int, device: torch.device,
                            run: Callable[[TileConfig], object] | None = None, plain: bool = False) -> TileConfig:
    if interpreting():
        return INTERPRETER_THRESHOLD_CONFIG
    arch = device_arch(device)
    return _pick(("threshold", dtype, shape_bin(rows), vocab, arch, plain), threshold_candidates(dtype, arch, plain),
                 run)

"""A device for runtime program tests: it records the programs a runtime would run (no toolchain, no
networks) and answers what the runtimes read back: token 7, zero logits and hidden states, and a sample
head's three candidates 11, 12, 13 with probabilities 0.5, 0.5, 0."""

import numpy as np

SEQ = 64


class Recorder:
    """Its nets have the mask dtype `dtype`, decode stages of `stages` cache rows and (with `in_place`) blocks
    whose input_states and hidden_states share an address; embeddings, lm_head and the decode blocks are
    io_alone (all nets, with `io_alone` True)."""

    def __init__(self, dtype="bf16", in_place=False, stages=(SEQ,), io_alone=None):
        self.programs, self._dtype, self._in_place, self._stages = [], dtype, in_place, list(stages)
        self._io_alone = io_alone

    def io_alone(self, net):
        return self._io_alone if self._io_alone is not None else net.startswith(("block_cache", "embedding", "lm_head"))

    def address(self, tensor):
        if self._in_place and tensor.net.startswith("block_") and tensor.index == 0:
            return 0x1000  # block_i's input_states and hidden_states at one address
        return None

    def dtype(self, tensor):
        return self._dtype

    def stage_rows(self, tensor):
        return self._stages

    def execute(self, program):
        self.programs.append(program)
        return {"next": np.array([7], np.int32), "hidden": np.zeros(128, np.float32), "logits": np.zeros(4, np.float32),
                "candidate_probs": np.array([0.5, 0.5, 0.0], np.float32), "candidates": np.array([11, 12, 13], np.int32),
                "penalised": np.zeros(1, np.int32)}

"""The single-process reference trainer (`xdtrain.reference.trainer`): the correctness and speed
baseline of the distributed engine (`xdtrain.train`), kept outside the engine package."""

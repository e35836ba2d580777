"""Real engines that run on a CPU, for tests and benchmarks: a real vLLM and a real Triton server,
each on a tiny model this project builds at test time."""

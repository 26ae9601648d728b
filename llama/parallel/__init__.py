"""The parallel wing: process groups, collectives, shared memory between ranks
of one host, checkpoint fingerprints compared across ranks, CPU threads.

Imports neither the engine nor the model."""

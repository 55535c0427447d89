"""Tests of the embedded inference engine and the continuous-batching scheduler."""

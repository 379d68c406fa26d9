"""Sharding plans and gradient-communication compression for TorchRec models."""

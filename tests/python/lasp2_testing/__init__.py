"""Helpers shared by the lasp2 Python tests (importable because pyproject.toml puts
tests/python on pytest's path):

  reference  independent float64 references (quadratic forms, differentiated by autograd)
  checks     the relative-error measure every numerical assertion uses
  dist       runs a test body on several processes joined by a process group
  errors     the one scaffold every bad-input test is written with
  compiled   a fullgraph-compiled function's gradients against eager
"""

"""Adapters that let pipeline tools run the rewrite as one of their steps. Each imports its tool
only where the tool calls it: the core package never needs them installed.

    olive_config   the FlashNorm Olive pass's options and the package config that names it
    olive_pass     the pass itself (imports olive-ai; Olive imports it through the package config)
"""

# SPDX-License-Identifier: Apache-2.0
"""The vLLM glue room: translates vLLM objects into policy inputs and back.

Everything that imports vLLM lives here.
"""

"""Build glue: the cffi fast-path module and the LD_PRELOAD shim (csrc/).

The shim is a plain shared library (no libpython), compiled with the same C compiler that
setuptools uses for extensions and placed inside the package as wrapguard/_shim.so.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

SHIM_SOURCES = sorted(
    os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".c")
)

HELPER_SOURCE = os.path.join("csrc", "seccomp", "helper.c")
HELPER_NAME = "_seccomp_helper"


class BuildWithShim(build_ext):
    def run(self) -> None:
        super().run()
        self.build_shim()
        self.build_seccomp_helper()

    def build_shim(self) -> None:
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler

        cc = new_compiler()
        customize_compiler(cc)
        objects = cc.compile(
            SHIM_SOURCES,
            output_dir=self.build_temp,
            extra_preargs=[
                "-fPIC",
                "-O2",
                "-Wall",
                "-Wextra",
                "-fvisibility=hidden",
                "-D_GNU_SOURCE",
            ],
        )
        out_dir = os.path.join(self.build_lib, "wrapguard")
        os.makedirs(out_dir, exist_ok=True)
        target = os.path.join(out_dir, "_shim.so")
        cc.link_shared_object(objects, target, libraries=["dl", "pthread"])
        if self.inplace:
            self.copy_file(target, os.path.join("wrapguard", "_shim.so"))

    def build_seccomp_helper(self) -> None:
        """The seccomp door's helper (csrc/seccomp/helper.c, docs/seccomp.md): a small
        executable that installs the filter and execs the program."""
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler

        cc = new_compiler()
        customize_compiler(cc)
        objects = cc.compile(
            [HELPER_SOURCE],
            output_dir=self.build_temp,
            extra_preargs=["-O2", "-Wall", "-Wextra", "-D_GNU_SOURCE"],
        )
        out_dir = os.path.join(self.build_lib, "wrapguard")
        os.makedirs(out_dir, exist_ok=True)
        target = os.path.join(out_dir, HELPER_NAME)
        cc.link_executable(objects, target)
        if self.inplace:
            self.copy_file(target, os.path.join("wrapguard", HELPER_NAME))

    def get_outputs(self) -> list[str]:
        return [
            *super().get_outputs(),
            os.path.join(self.build_lib, "wrapguard", "_shim.so"),
            os.path.join(self.build_lib, "wrapguard", HELPER_NAME),
        ]


setup(
    cffi_modules=["wrapguard/_fastpath_build.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithShim},
)

# CMake toolchain file for cross-compiling the HMatMul library for 64-bit ARM Linux
# (e.g. Raspberry Pi 4/5, Jetson) with Debian's gcc cross compiler
# (apt-get install g++-aarch64-linux-gnu). See docs/custom_op.md.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Only the compilers come from the host; libraries and headers from the target sysroot.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

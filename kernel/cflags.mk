# kernel/cflags.mk -- the C compiler flags of what vchan compiles, in one place.
#
# Read by the extension's build (vchan/_native_build.py), by the drop-in Xen
# libraries' builds (vchan/sim/_compat_build.py: `vchan sim run`, setup.py)
# and included by kernel/compat/Makefile.  Python parses it, so keep to
# plain `NAME = words` lines and comments.

# Everything: the extension (vchan._native) and the libraries.
VCHAN_CFLAGS = -O2 -std=gnu11 -Wall -Wextra -Wno-unused-parameter

# The drop-in libraries (kernel/compat) add these.
VCHAN_COMPAT_CFLAGS = -g -fPIC
VCHAN_COMPAT_LDFLAGS = -shared -Wl,--no-undefined -Wl,-z,defs

# topiary: one binary, a static core library, one test binary per tests/test_*.c.
#
#   make            build ./topiary
#   make demo       install packages, fetch the real models and data, run them
#   make check      install packages, fetch models and data, then `make test`
#   make test       build and run every test (tests/run.sh prints "N passed, M failed")
#   make asan       the same tests under AddressSanitizer + UBSan
#   make valgrind   the unit tests under valgrind memcheck
#   make fuzz       build the libFuzzer targets in tests/fuzz/ (clang)
#   make bench      the benchmarks in bench/
#   make lint       clang-format check and cppcheck

CC       ?= cc
BUILD    ?= build
BIN      ?= topiary
OPT      ?= -O2
CSTD     := -std=c17 -D_GNU_SOURCE
WARN     := -Wall -Wextra -Wpedantic -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
            -Wpointer-arith -Wcast-qual -Wwrite-strings -Wvla -Wformat=2 -Wundef
ifeq ($(CI),true)
WARN     += -Werror
endif
# No fast-math anywhere: results are checked against PyTorch and TF.js.
CFLAGS   ?= $(OPT) -g
ALL_CFLAGS := $(CSTD) $(WARN) $(CFLAGS) -fopenmp -fno-fast-math -MMD -MP \
              -I core -I api -I server -I /usr/include/x86_64-linux-gnu/openblas-pthread
PKGS     := libmicrohttpd jansson libuv sqlite3 libpng zlib
LDLIBS   := -fopenmp -lopenblas -llapacke $(shell pkg-config --libs $(PKGS) 2>/dev/null) \
            -ljpeg -lm -lpthread

CORE_SRC   := $(wildcard core/*.c)
SERVER_SRC := $(filter-out server/main.c,$(wildcard server/*.c)) $(wildcard api/*.c)
MAIN_SRC   := server/main.c
TEST_SRC   := $(wildcard tests/test_*.c)
FUZZ_SRC   := $(wildcard tests/fuzz/fuzz_*.c)

CORE_OBJ   := $(CORE_SRC:%.c=$(BUILD)/%.o)
SERVER_OBJ := $(SERVER_SRC:%.c=$(BUILD)/%.o)
LIB        := $(BUILD)/libtopiary.a
TEST_BIN   := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)

.PHONY: all test check deps data asan valgrind fuzz bench bench-prune lint clean demo
all: $(BIN) $(TEST_BIN)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(LIB): $(CORE_OBJ) $(SERVER_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BIN): $(BUILD)/server/main.o $(LIB)
	$(CC) $(ALL_CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(LIB) tests/test.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -I tests $< $(LIB) -o $@ $(LDLIBS)

# The README's test command: install packages, fetch the real models and data
# sets (idempotent, sha256-checked), build, run every test.
check: deps data
	$(MAKE) test

# The README's first command: the main job on real input, end to end.
demo:
	bash tools/demo.sh

deps:
	bash tools/install-deps.sh build test

data:
	bash tools/fetch-models.sh
	bash tools/fetch-data.sh

test: all
	BUILD=$(BUILD) TOPIARY_BIN=$(abspath $(BIN)) bash tests/run.sh

asan:
	$(MAKE) BUILD=build-asan BIN=build-asan/topiary \
	  CFLAGS="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" \
	  test

valgrind: all
	BUILD=$(BUILD) TOPIARY_BIN=$(abspath $(BIN)) VALGRIND=1 bash tests/run.sh

FUZZ_BIN := $(FUZZ_SRC:tests/fuzz/%.c=build-fuzz/%)
fuzz: $(FUZZ_BIN)
build-fuzz/%: tests/fuzz/%.c $(CORE_SRC)
	@mkdir -p build-fuzz
	clang $(CSTD) -O1 -g -fsanitize=fuzzer,address,undefined -fopenmp=libgomp -I core \
	  -I /usr/include/x86_64-linux-gnu/openblas-pthread $< $(CORE_SRC) -o $@ \
	  -lopenblas -llapacke $(shell pkg-config --libs jansson libpng zlib) -ljpeg -lm -lgomp

$(BUILD)/bench/%: bench/%.c $(LIB) bench/bench_util.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -I bench $< $(LIB) -o $@ $(LDLIBS)

bench: all
	BUILD=$(BUILD) bash bench/run.sh

bench-prune: all
	BUILD=$(BUILD) bash bench/prune_bench.sh

lint:
	clang-format --dry-run --Werror $(CORE_SRC) $(SERVER_SRC) $(MAIN_SRC) core/*.h
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability \
	  --suppress=missingIncludeSystem -I core core server api

clean:
	rm -rf build build-asan build-fuzz topiary

-include $(CORE_OBJ:.o=.d) $(SERVER_OBJ:.o=.d) $(BUILD)/server/main.d

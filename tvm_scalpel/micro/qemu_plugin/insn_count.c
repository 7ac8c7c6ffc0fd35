/* Count executed guest instructions between the first instruction of cost_begin() and of cost_end().
 *
 * Arguments: begin=<hex address>,end=<hex address>,out=<file>. Every executed instruction adds one to a
 * counter (inline, no callback); an exec callback on the two marker addresses snapshots it. The file gets
 * one line per begin/end pair: the instructions executed between them. Deterministic for a given binary:
 * TCG executes the same guest instructions whatever the host does.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qemu_plugin_api.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static uint64_t executed, began, begin_addr, end_addr;
static int inside;
static FILE *out;

static void on_begin(unsigned int vcpu, void *udata) {
  (void)vcpu; (void)udata;
  began = executed;
  inside = 1;
}

static void on_end(unsigned int vcpu, void *udata) {
  (void)vcpu; (void)udata;
  if (!inside) return;
  inside = 0;
  fprintf(out, "%" PRIu64 "\n", executed - began);
  fflush(out);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  for (size_t i = 0; i < n; i++) {
    struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    uint64_t pc = qemu_plugin_insn_vaddr(insn);
    /* The snapshot callbacks run before the instruction's own inline increment. */
    if (pc == begin_addr) qemu_plugin_register_vcpu_insn_exec_cb(insn, on_begin, QEMU_PLUGIN_CB_NO_REGS, NULL);
    if (pc == end_addr) qemu_plugin_register_vcpu_insn_exec_cb(insn, on_end, QEMU_PLUGIN_CB_NO_REGS, NULL);
    qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &executed, 1);
  }
}

static void on_plugin_exit(qemu_plugin_id_t id, void *udata) {
  (void)id; (void)udata;
  if (out) fclose(out);
  out = NULL;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  (void)info;
  const char *path = NULL;
  for (int i = 0; i < argc; i++) {
    if (!strncmp(argv[i], "begin=", 6)) begin_addr = strtoull(argv[i] + 6, NULL, 16);
    else if (!strncmp(argv[i], "end=", 4)) end_addr = strtoull(argv[i] + 4, NULL, 16);
    else if (!strncmp(argv[i], "out=", 4)) path = argv[i] + 4;
  }
  if (!begin_addr || !end_addr || !path) {
    fprintf(stderr, "insn_count: expected begin=<hex>,end=<hex>,out=<file>\n");
    return -1;
  }
  out = fopen(path, "w");
  if (!out) { perror(path); return -1; }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  qemu_plugin_register_atexit_cb(id, on_plugin_exit, NULL);
  return 0;
}

/* Declarations cffi reads to build vchan._native (see _native_build.py).
 * The real definitions are in ring.h; cffi checks these against them. */

struct vchan_ring_shared {
    uint32_t cons;
    uint32_t prod;
};

struct vchan_interface {
    struct vchan_ring_shared left, right;
    uint16_t left_order, right_order;
    uint8_t cli_live, srv_live;
    uint8_t cli_notify, srv_notify;
    uint32_t grants[];
};

/* Private state: only the fields white-box tests poke at are declared. */
struct vchan_half {
    uint32_t own;
    uint32_t peer;
    ...;
};

struct vchan_ring {
    struct vchan_half rd, wr;
    ...;
};

#define VCHAN_PAGE_SIZE ...
#define VCHAN_NOTIFY_WRITE ...
#define VCHAN_NOTIFY_READ ...
#define VCHAN_NOTIFY_EOF ...
#define VCHAN_NOTIFY_CLOSED ...
#define VCHAN_NOTIFY_HELLO ...
#define VCHAN_LIVE_CLOSED ...
#define VCHAN_LIVE_CONNECTED ...
#define VCHAN_LIVE_WAITING ...
#define VCHAN_SMALL_ORDER ...
#define VCHAN_LARGE_ORDER ...
#define VCHAN_SMALL_OFFSET ...
#define VCHAN_LARGE_OFFSET ...
#define VCHAN_MIN_ORDER ...
#define VCHAN_MAX_ORDER ...
#define VCHAN_MAX_RING_SIZE ...
#define VCHAN_OFFSET_CLI_LIVE ...
#define VCHAN_OFFSET_SRV_LIVE ...
#define VCHAN_EINVAL ...
#define VCHAN_EMSGSIZE ...
#define VCHAN_ECLOSED ...
#define VCHAN_EINDEX ...
#define VCHAN_EORDER ...
#define VCHAN_ELIVE ...

int vchan_server_orders(size_t read_min, size_t write_min,
                        int *read_order, int *write_order);
int vchan_client_orders(const struct vchan_interface *page0,
                        int *read_order, int *write_order);
int vchan_ring_offset(int order);
int vchan_ring_pages(int order);
int vchan_ring_init_server(struct vchan_ring *r, void *page0,
                           int read_order, int write_order,
                           void *rd_buf, void *wr_buf);
int vchan_ring_init_client(struct vchan_ring *r, void *page0,
                           int read_order, int write_order,
                           void *rd_buf, void *wr_buf);
int vchan_ring_data_ready(struct vchan_ring *r);
int vchan_ring_buffer_space(struct vchan_ring *r);
int vchan_ring_write_now(struct vchan_ring *r);
void vchan_ring_disarm(struct vchan_ring *r);
int vchan_ring_write(struct vchan_ring *r, const void *data, size_t len,
                     int *notify);
int vchan_ring_writev(struct vchan_ring *r, const void *const *bufs,
                      const size_t *lens, size_t n, int *notify);
int vchan_ring_send(struct vchan_ring *r, const void *data, size_t len,
                    int *notify);
int vchan_ring_peek(struct vchan_ring *r, const uint8_t **a, uint32_t *alen,
                    const uint8_t **b, uint32_t *blen);
int vchan_ring_consume(struct vchan_ring *r, uint32_t n, int *notify);
int vchan_ring_reserve(struct vchan_ring *r, uint8_t **a, uint32_t *alen,
                       uint8_t **b, uint32_t *blen);
int vchan_ring_commit(struct vchan_ring *r, uint32_t n, int *notify);
int vchan_ring_peek_min(struct vchan_ring *r, size_t want, const uint8_t **a, uint32_t *alen,
                        const uint8_t **b, uint32_t *blen);
int vchan_ring_reserve_min(struct vchan_ring *r, size_t want, uint8_t **a, uint32_t *alen,
                           uint8_t **b, uint32_t *blen);

#define VCHAN_SPLICE_EOF ...
#define VCHAN_SPLICE_ERRNO ...
int vchan_splice_to_fd(struct vchan_ring *r, int fd, size_t max, int *notify, int *err);
int vchan_splice_from_fd(struct vchan_ring *r, int fd, size_t max, int *notify, int *err);
#define VCHAN_MUX_HEADER ...
#define VCHAN_MUX_FULL ...
#define VCHAN_MUX_EFRAME ...
struct vchan_mux_frame {
    uint8_t type;
    uint8_t flags;
    uint32_t stream;
    uint32_t length;
    uint32_t arg;
};
int vchan_mux_write(struct vchan_ring *r, uint8_t type, uint8_t flags, uint32_t stream,
                    uint32_t arg, const void *data, uint32_t len, uint32_t min_payload,
                    uint32_t max_payload, int *notify);
int vchan_mux_write_ex(struct vchan_ring *r, uint8_t type, uint8_t flags, uint32_t stream,
                       uint32_t arg, const void *data, uint32_t len, uint32_t min_payload,
                       uint32_t max_payload, int quiet, int *notify);
int vchan_ring_commit_quiet(struct vchan_ring *r, uint32_t n);
int vchan_ring_publish(struct vchan_ring *r, int *notify);
int vchan_mux_write_data(struct vchan_ring *r, uint32_t stream, const void *data, uint32_t len,
                         uint32_t min_payload, uint32_t max_payload, int *notify);
int vchan_mux_peek(struct vchan_ring *r, struct vchan_mux_frame *f, uint32_t max_payload,
                   const uint8_t **a, uint32_t *alen, const uint8_t **b, uint32_t *blen);
int vchan_mux_take(struct vchan_ring *r, const struct vchan_mux_frame *f, const uint8_t *a,
                   uint32_t alen, const uint8_t *b, uint32_t blen, void *buf, int *notify);
int vchan_mux_take_run(struct vchan_ring *r, const struct vchan_mux_frame *f,
                       const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen,
                       uint32_t max_payload, uint32_t credit, void *buf, uint32_t len,
                       int *notify);
int vchan_mux_run_length(struct vchan_ring *r, const struct vchan_mux_frame *f,
                         uint32_t max_payload, uint32_t limit);
struct vchan_direct {
    struct vchan_ring *ring;
    int *notify;
    uint32_t max_payload;
    uint32_t stream;
    uint32_t flags;
    uint32_t left;
    uint32_t offset;
    uint32_t freed;
    uint32_t wake_after;
};
int vchan_direct_take(struct vchan_direct *d, void *buf, uint32_t len);
int vchan_direct_find(struct vchan_direct *d, uint8_t sep, uint32_t limit);
int vchan_direct_rest(struct vchan_direct *d);
int vchan_direct_due(const struct vchan_direct *d);
int vchan_ring_read(struct vchan_ring *r, void *buf, size_t len, int *notify);
int vchan_ring_recv(struct vchan_ring *r, void *buf, size_t len, int *notify);
int vchan_ring_peer_live(struct vchan_ring *r);
int vchan_ring_peer_eof(struct vchan_ring *r);
int vchan_ring_peer_flags(struct vchan_ring *r);
int vchan_ring_write_eof(struct vchan_ring *r, int *notify);
void vchan_ring_close(struct vchan_ring *r);
int vchan_ring_error(const struct vchan_ring *r);
const char *vchan_strerror(int code);

/* ---- kernel/kernel.h: the device layer ---- */

#define VK_PAGE_SIZE ...
#define VK_DOMID_FIRST_RESERVED ...
#define VK_MAX_VIEWS ...
enum vk_kind { VK_GNTSHR, VK_GNTTAB, VK_EVTCHN, ... };

struct vk_ops;
struct vk_dev {
    int kind;
    int fd;
    uint32_t domid;
    int server;         /* pid_t */
    int failed;
    ...;
};
struct vk_map {
    void *views[];
    int nviews;
    uint32_t count;
    int writable;
    int shared;
    uint64_t index;
    int token;
    ...;
};

const struct vk_ops *vk_backend(const char *name);
int vk_open(struct vk_dev *d, const struct vk_ops *ops, int kind, uint32_t domid);
void vk_close(struct vk_dev *d);
int vk_share(struct vk_dev *d, uint32_t domid, uint32_t count, int writable,
             uint32_t *refs, int notify_offset, int notify_port, struct vk_map *m);
int vk_map(struct vk_dev *d, uint32_t count, const uint32_t *domids, const uint32_t *refs,
           int writable, int notify_offset, int notify_port, struct vk_map *m);
int vk_map_view(struct vk_map *m, void **addr);
int vk_unmap(struct vk_map *m);
int vk_set_max_grants(struct vk_dev *d, uint32_t count);
int vk_bind_unbound(struct vk_dev *d, uint32_t remote_domid);
int vk_bind_interdomain(struct vk_dev *d, uint32_t remote_domid, uint32_t remote_port);
int vk_unbind(struct vk_dev *d, uint32_t port);
int vk_notify(struct vk_dev *d, uint32_t port);
int vk_pending(struct vk_dev *d);
int vk_unmask(struct vk_dev *d, uint32_t port);
int vk_take_events(struct vk_dev *d, uint32_t *ports, int max);
int vk_fd(struct vk_dev *d);
int vk_port_fd(struct vk_dev *d, uint32_t port);
int vk_port_unwatch(struct vk_dev *d, uint32_t port);
int vk_fd_consume(int fd);
int vk_sim_set_socket(const char *path);
int vk_sim_check(struct vk_dev *d);

/* ---- vchan/session.h: a session's per-message fast paths ---- */

#define VCHAN_SESSION_LATER ...

int vchan_session_send(struct vchan_ring *r, uint32_t stream, const void *data, uint32_t len,
                       uint32_t min_payload, uint32_t max_payload, int *notify,
                       struct vk_dev *dev, uint32_t port, uint64_t *woken, int now_only);
struct vchan_iov {
    const void *base;
    uint32_t len;
};
struct vchan_session_out {
    struct vchan_ring *ring;
    int *notify;
    struct vk_dev *dev;
    uint32_t port;
    uint64_t *woken;
    uint32_t min_payload;
    uint32_t max_payload;
};
int vchan_session_writev(const struct vchan_session_out *o, uint32_t stream,
                         const struct vchan_iov *iov, uint32_t len);

/* ---- kernel/sim_proto.h: the emulated hypervisor's wire protocol ----
 * Declared so that Python takes the numbers from the header
 * (vchan/sim/protocol.py); cffi checks the structs against it. */

#define VS_VERSION ...
#define VS_MAX_MSG ...
#define VS_MAX_FDS ...
#define VS_KIND_CONTROL ...
enum vs_op { VS_HELLO, VS_GNT_SHARE, VS_GNT_MAP, VS_GNT_RELEASE, VS_EVT_BIND_UNBOUND,
             VS_EVT_BIND_INTERDOMAIN, VS_EVT_UNBIND, VS_CONTROL, ... };

struct vs_request {
    uint32_t op;
    uint32_t len;
};

struct vs_reply {
    int32_t status;
    uint32_t len;
};

struct vs_segment {
    uint32_t first;
    uint32_t npages;
    uint32_t fd;
    uint32_t pad;
    uint64_t offset;
};

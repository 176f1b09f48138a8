// gorelay is a Go tunnel relay for visiona_tunnel's interop tests: the
// counterpart of goagent (and of the Python agent). It accepts agents' tunnel
// WebSockets (gorilla/websocket), runs a yamux *server* session on each
// (Debian's hashicorp/yamux snapshot df201c7) and forwards HTTP requests and
// WebSockets from a plain HTTP front through them.
//
// Usage (this CLI is stable; the Python tests depend on it):
//
//	gorelay -listen 127.0.0.1:0 -http 127.0.0.1:0 -tokens tokenA=device-1,tokenB=device-2
//
// Tunnel listener (-listen):
//
//	GET /tunnel/connect?token=T   unknown or missing token: 401 before the upgrade.
//	                              Else upgrade (64 KiB buffers, 64 MiB read limit)
//	                              and serve a yamux server session for T's device.
//	                              A newer connection for the same device replaces
//	                              the old one, which is closed with WebSocket close
//	                              code 4001 reason "replaced".
//
// HTTP front (-http):
//
//	ANY  /forward/<device>/<path>  opens a yamux stream to the device's agent and
//	                               writes the request as HTTP/1.1 for /<path>
//	                               (query kept; hop-by-hop headers and Expect
//	                               dropped; Host kept; body streamed), then
//	                               streams back the response read with
//	                               http.ReadResponse, once the whole request
//	                               has been forwarded. No session: 502 with body
//	                               TUNNEL_DISCONNECTED. A bad or missing response
//	                               from the agent: 502 with body TUNNEL_ERROR.
//	GET  /ws/<device>/<path>       WebSocket: handshake with the agent's local
//	                               server over a new stream first (a refusal
//	                               passes its status on, with body
//	                               UPSTREAM_REFUSED), then accept the caller
//	                               and relay messages both ways, close codes
//	                               included (an abnormal end closes without a
//	                               close frame).
//	POST /close/<device>?code=N&reason=R
//	                               close that device's tunnel WebSocket with this
//	                               close code (default 1000): 204, or 404.
//
// When the caller gives up mid-response, the stream is closed at once. This
// yamux snapshot has no way to send RST on a stream, so that is a FIN: an
// agent must take EOF after the request as "the relay gave up".
//
// stdout, one line per event (tests wait for these):
//
//	TUNNEL LISTENING <port>
//	HTTP LISTENING <port>
//	AGENT CONNECTED <device>      a session is registered
//	AGENT DISCONNECTED <device>   a session ended
//
// After a replacement, the new session's CONNECTED comes before the old one's
// DISCONNECTED; when an agent redials after its session ended, the old
// session's DISCONNECTED and the new CONNECTED may come in either order.
//
// stderr: free-form logs. SIGINT/SIGTERM close every session (close code
// 1001) and exit 0; bad flags exit 2.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
	"github.com/hashicorp/yamux"

	"tunnelpeers/internal/hop"
	"tunnelpeers/internal/wsconn"
)

const (
	keepAliveInterval      = 10 * time.Second
	connectionWriteTimeout = 10 * time.Second
	// closeReplaced is the close code for "replaced by a newer connection for
	// the same token" (visiona_tunnel.CLOSE_REPLACED).
	closeReplaced = 4001
	readLimit     = 64 << 20
)

var logger = log.New(os.Stderr, "gorelay: ", log.Lmicroseconds)

var outMu sync.Mutex

// event prints one stdout line for the tests.
func event(format string, args ...interface{}) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Printf(format+"\n", args...)
}

var upgrader = websocket.Upgrader{
	ReadBufferSize:  wsconn.BufferSize,
	WriteBufferSize: wsconn.BufferSize,
	CheckOrigin:     func(*http.Request) bool { return true },
}

type tunnel struct {
	device  string
	conn    *wsconn.Conn
	session *yamux.Session
}

// close sends a close frame, waits a little for the agent's reply, and ends the session.
func (t *tunnel) close(code int, reason string) {
	t.conn.CloseWithCode(code, reason, 2*time.Second)
	t.session.Close()
}

type relay struct {
	tokens   map[string]string // token -> device
	mu       sync.Mutex
	tunnels  map[string]*tunnel // device -> live session
	sessions sync.WaitGroup
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "tunnel WebSocket listener")
	front := flag.String("http", "127.0.0.1:0", "HTTP front listener")
	tokens := flag.String("tokens", "", "valid tokens: token=device,token=device")
	flag.Parse()
	rl := &relay{tokens: map[string]string{}, tunnels: map[string]*tunnel{}}
	for _, pair := range strings.Split(*tokens, ",") {
		if pair == "" {
			continue
		}
		token, device, ok := strings.Cut(pair, "=")
		if !ok || token == "" || device == "" || strings.Contains(device, "/") {
			fmt.Fprintf(os.Stderr, "gorelay: bad -tokens entry %q\n", pair)
			os.Exit(2)
		}
		rl.tokens[token] = device
	}

	tunnelLn, err := net.Listen("tcp", *listen)
	if err != nil {
		logger.Fatal(err)
	}
	frontLn, err := net.Listen("tcp", *front)
	if err != nil {
		logger.Fatal(err)
	}
	tunnelSrv := &http.Server{Handler: http.HandlerFunc(rl.serveTunnel), ReadHeaderTimeout: 10 * time.Second}
	frontSrv := &http.Server{Handler: http.HandlerFunc(rl.serveFront), ReadHeaderTimeout: 10 * time.Second}
	go tunnelSrv.Serve(tunnelLn)
	go frontSrv.Serve(frontLn)
	event("TUNNEL LISTENING %d", tunnelLn.Addr().(*net.TCPAddr).Port)
	event("HTTP LISTENING %d", frontLn.Addr().(*net.TCPAddr).Port)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	logger.Printf("shutting down")
	tunnelSrv.Close()
	frontSrv.Close()
	rl.mu.Lock()
	for _, t := range rl.tunnels {
		go t.close(websocket.CloseGoingAway, "relay shutting down")
	}
	rl.mu.Unlock()
	done := make(chan struct{})
	go func() { rl.sessions.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		logger.Printf("sessions did not end in time")
	}
}

func (rl *relay) lookup(device string) *tunnel {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	return rl.tunnels[device]
}

func (rl *relay) serveTunnel(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/tunnel/connect" {
		http.NotFound(w, r)
		return
	}
	device, ok := rl.tokens[r.URL.Query().Get("token")]
	if !ok {
		logger.Printf("tunnel from %s: unknown or missing token", r.RemoteAddr)
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	ws, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade has answered
	}
	ws.SetReadLimit(readLimit)
	conn := wsconn.New(ws)
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = true
	cfg.KeepAliveInterval = keepAliveInterval
	cfg.ConnectionWriteTimeout = connectionWriteTimeout
	cfg.LogOutput = nil
	cfg.Logger = log.New(os.Stderr, "gorelay yamux: ", log.Lmicroseconds)
	session, err := yamux.Server(conn, cfg)
	if err != nil {
		conn.Close()
		return
	}
	t := &tunnel{device: device, conn: conn, session: session}
	rl.sessions.Add(1)
	defer rl.sessions.Done()
	rl.mu.Lock()
	old := rl.tunnels[device]
	rl.tunnels[device] = t
	rl.mu.Unlock()
	event("AGENT CONNECTED %s", device)
	if old != nil {
		logger.Printf("device %s: a new connection replaces the old one", device)
		go old.close(closeReplaced, "replaced")
	}

	<-session.CloseChan()
	conn.Close()
	rl.mu.Lock()
	if rl.tunnels[device] == t {
		delete(rl.tunnels, device)
	}
	rl.mu.Unlock()
	logger.Printf("device %s: session ended: %v", device, conn.ReadErr())
	event("AGENT DISCONNECTED %s", device)
}

// splitRoute splits "/<prefix>/<device>/<rest>" of the escaped path into
// device and "/<rest>" (still escaped).
func splitRoute(r *http.Request, prefix string) (device, rest string, ok bool) {
	p := r.URL.EscapedPath()
	if !strings.HasPrefix(p, prefix) {
		return "", "", false
	}
	device, rest, _ = strings.Cut(p[len(prefix):], "/")
	return device, "/" + rest, device != ""
}

func (rl *relay) serveFront(w http.ResponseWriter, r *http.Request) {
	if device, rest, ok := splitRoute(r, "/forward/"); ok {
		rl.forward(w, r, device, rest)
	} else if device, rest, ok := splitRoute(r, "/ws/"); ok && r.Method == http.MethodGet {
		rl.forwardWebSocket(w, r, device, rest)
	} else if device, _, ok := splitRoute(r, "/close/"); ok && r.Method == http.MethodPost {
		rl.closeDevice(w, r, device)
	} else {
		http.NotFound(w, r)
	}
}

func plainError(w http.ResponseWriter, code int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	io.WriteString(w, body)
}

func target(rest, rawQuery string) (*url.URL, error) {
	if rawQuery != "" {
		rest += "?" + rawQuery
	}
	return url.ParseRequestURI(rest)
}

func (rl *relay) forward(w http.ResponseWriter, r *http.Request, device, rest string) {
	t := rl.lookup(device)
	if t == nil {
		plainError(w, http.StatusBadGateway, "TUNNEL_DISCONNECTED")
		return
	}
	u, err := target(rest, r.URL.RawQuery)
	if err != nil {
		plainError(w, http.StatusBadRequest, "BAD_PATH")
		return
	}
	stream, err := t.session.OpenStream()
	if err != nil {
		plainError(w, http.StatusBadGateway, "TUNNEL_DISCONNECTED")
		return
	}
	defer stream.Close()

	out := &http.Request{
		Method:        r.Method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        r.Header.Clone(),
		Host:          r.Host,
		Body:          r.Body,
		ContentLength: r.ContentLength, // -1: unknown, sent chunked
	}
	if r.ContentLength == 0 {
		out.Body = nil
	}
	hop.Strip(out.Header)
	out.Header.Del("Expect")
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header["User-Agent"] = []string{""} // keep Request.Write from adding Go's
	}
	forwarded := make(chan struct{})
	go func() {
		defer close(forwarded)
		bw := bufio.NewWriterSize(stream, 64<<10) // Request.Write flushes it per chunk
		err := out.Write(bw)
		if err == nil {
			err = bw.Flush()
		}
		if err != nil {
			logger.Printf("forward %s: writing the request: %v", device, err)
			stream.Close()
		}
	}()
	// The caller gave up: close the stream so the agent stops.
	handlerDone := make(chan struct{})
	defer close(handlerDone)
	go func() {
		select {
		case <-r.Context().Done():
			stream.Close()
		case <-handlerDone:
		}
	}()

	resp, err := http.ReadResponse(bufio.NewReaderSize(stream, 64<<10), out)
	if err != nil {
		if r.Context().Err() == nil {
			logger.Printf("forward %s: reading the response: %v", device, err)
			plainError(w, http.StatusBadGateway, "TUNNEL_ERROR")
		}
		return
	}
	defer resp.Body.Close()
	// net/http's HTTP/1 server discards the unread request body once a response
	// starts, so the response is passed on after the whole request was forwarded.
	select {
	case <-forwarded:
	case <-r.Context().Done():
		return
	}
	h := w.Header()
	for k, v := range resp.Header {
		h[k] = v
	}
	hop.Strip(h)
	w.WriteHeader(resp.StatusCode)
	flusher, _ := w.(http.Flusher)
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return // the caller is gone; the deferred Close ends the stream
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
		if err == io.EOF {
			return
		}
		if err != nil {
			if r.Context().Err() == nil {
				logger.Printf("forward %s: response body: %v", device, err)
			}
			// Returning early makes net/http cut the response short (no final chunk).
			panic(http.ErrAbortHandler)
		}
	}
}

func (rl *relay) forwardWebSocket(w http.ResponseWriter, r *http.Request, device, rest string) {
	t := rl.lookup(device)
	if t == nil {
		plainError(w, http.StatusBadGateway, "TUNNEL_DISCONNECTED")
		return
	}
	u, err := target(rest, r.URL.RawQuery)
	if err != nil {
		plainError(w, http.StatusBadRequest, "BAD_PATH")
		return
	}
	stream, err := t.session.OpenStream()
	if err != nil {
		plainError(w, http.StatusBadGateway, "TUNNEL_DISCONNECTED")
		return
	}
	// Handshake with the agent's local server over the stream first.
	dialer := websocket.Dialer{
		NetDialContext: func(context.Context, string, string) (net.Conn, error) {
			return stream, nil
		},
		Proxy:            nil,
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   wsconn.BufferSize,
		WriteBufferSize:  wsconn.BufferSize,
		Subprotocols:     websocket.Subprotocols(r),
	}
	header := http.Header{}
	for k, v := range r.Header {
		if !strings.HasPrefix(k, "Sec-Websocket-") {
			header[k] = v
		}
	}
	hop.Strip(header)
	header.Set("Host", r.Host)
	u.Scheme, u.Host = "ws", r.Host
	upstream, resp, err := dialer.DialContext(r.Context(), u.String(), header)
	if err != nil {
		stream.Close()
		logger.Printf("ws %s: handshake with the agent: %v", device, err)
		if resp != nil {
			plainError(w, resp.StatusCode, "UPSTREAM_REFUSED")
		} else {
			plainError(w, http.StatusBadGateway, "TUNNEL_ERROR")
		}
		return
	}
	defer upstream.Close()
	upstream.SetReadLimit(readLimit)
	respHeader := http.Header{}
	if p := upstream.Subprotocol(); p != "" {
		respHeader.Set("Sec-WebSocket-Protocol", p)
	}
	browser, err := upgrader.Upgrade(w, r, respHeader)
	if err != nil {
		return
	}
	defer browser.Close()
	browser.SetReadLimit(readLimit)
	relayMessages(browser, upstream)
}

type pumpEnd struct {
	dst     *websocket.Conn
	readErr error // nil if writing to dst failed
}

// pump copies messages from src to dst, streaming each one.
func pump(dst, src *websocket.Conn, ends chan<- pumpEnd) {
	for {
		kind, r, err := src.NextReader()
		if err != nil {
			ends <- pumpEnd{dst: dst, readErr: err}
			return
		}
		wr, err := dst.NextWriter(kind)
		if err == nil {
			if _, err = io.Copy(wr, r); err == nil {
				err = wr.Close()
			}
		}
		if err != nil {
			ends <- pumpEnd{dst: dst}
			return
		}
	}
}

// relayMessages relays until one side ends, passes its close code on, and
// waits (bounded) for the other side's close.
func relayMessages(browser, upstream *websocket.Conn) {
	ends := make(chan pumpEnd, 2)
	go pump(upstream, browser, ends)
	go pump(browser, upstream, ends)
	first := <-ends
	var closeErr *websocket.CloseError
	if errors.As(first.readErr, &closeErr) && closeErr.Code != websocket.CloseAbnormalClosure {
		msg := websocket.FormatCloseMessage(closeErr.Code, closeErr.Text)
		_ = first.dst.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	} else {
		// An abnormal end (or a failed write): no close frame, just close.
		browser.Close()
		upstream.Close()
	}
	select {
	case <-ends:
	case <-time.After(5 * time.Second):
	}
}

func (rl *relay) closeDevice(w http.ResponseWriter, r *http.Request, device string) {
	t := rl.lookup(device)
	if t == nil {
		plainError(w, http.StatusNotFound, "NO_SESSION")
		return
	}
	code := websocket.CloseNormalClosure
	if s := r.URL.Query().Get("code"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			plainError(w, http.StatusBadRequest, "BAD_CODE")
			return
		}
		code = n
	}
	t.close(code, r.URL.Query().Get("reason"))
	w.WriteHeader(http.StatusNoContent)
}

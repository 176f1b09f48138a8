// goagent is a Go tunnel agent for visiona_tunnel's interop tests, modelled on
// the seed's Go tunnel client (seeds/001): it dials the relay's WebSocket,
// runs a yamux *client* session over it (gorilla/websocket + Debian's
// hashicorp/yamux snapshot df201c7) and serves the streams the relay opens,
// each carrying one HTTP/1.1 request for the local server.
//
// Usage (this CLI is stable; the Python tests depend on it):
//
//	goagent -relay-url ws://HOST:PORT/tunnel/connect -token T -local 127.0.0.1:PORT
//	        [-backoff-base 1s] [-backoff-cap 30s]
//
// The token goes in the query parameter "token". Per stream: a request with
// "Upgrade: websocket" is written raw to a new TCP connection to -local and
// the bytes are piped both ways; any other request is forwarded with an
// http.Transport (no redirects followed, no automatic decompression) and the
// response is written back streamed (Content-Length kept, else chunked, one
// flush per read), then the stream is closed. A local failure answers 502 with
// a short text/plain body. If the relay ends the stream (FIN or RST) before the
// response is complete, the local request is cancelled and the stream closed:
// the relay sends nothing after the request, so EOF from it means it gave up.
//
// Reconnects forever. Backoff after a failed dial: base * 2^(attempt-1) capped
// (1, 2, 4, 8, 16, 30, 30 s); a session that was up resets it and redials at
// once, except when the relay closed the WebSocket with code 4001 ("replaced
// by a newer connection for the same token"), which counts as a failed
// attempt. HTTP 401/403 on the upgrade backs off by the cap.
//
// stdout, one line per event (tests wait for these):
//
//	AGENT ONLINE                         a yamux session is up
//	AGENT OFFLINE <reason>               it ended, e.g. "websocket: close 4001: replaced"
//	AGENT RETRY <attempt> <delay> <why>  next dial in <delay> (Go duration: 1s, 30s);
//	                                     why is dial-failed, replaced or unauthorized
//
// stderr: free-form logs. SIGINT/SIGTERM close the session (close code 1000)
// and exit 0; bad flags exit 2.
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
	// closeReplaced is the relay's close code for "replaced by a newer
	// connection for the same token" (visiona_tunnel.CLOSE_REPLACED).
	closeReplaced = 4001
)

var errUnauthorized = errors.New("relay rejected the token")

var logger = log.New(os.Stderr, "goagent: ", log.Lmicroseconds)

var outMu sync.Mutex

// event prints one stdout line for the tests.
func event(format string, args ...interface{}) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Printf(format+"\n", args...)
}

type agent struct {
	relayURL    string
	token       string
	local       string
	backoffBase time.Duration
	backoffCap  time.Duration
	wsBuffer    int
	transport   *http.Transport
}

func main() {
	a := &agent{}
	flag.StringVar(&a.relayURL, "relay-url", "", "ws://HOST:PORT/tunnel/connect")
	flag.StringVar(&a.token, "token", "", "device token (query parameter \"token\")")
	flag.StringVar(&a.local, "local", "", "local server HOST:PORT")
	flag.DurationVar(&a.backoffBase, "backoff-base", time.Second, "first retry delay")
	flag.DurationVar(&a.backoffCap, "backoff-cap", 30*time.Second, "largest retry delay")
	// 0: gorilla's defaults (4 KiB), as the seed's agent (websocket.DefaultDialer): every
	// message larger than that is sent as 4 KiB frames.
	flag.IntVar(&a.wsBuffer, "ws-buffer", 0, "WebSocket read and write buffer size (0: gorilla's 4 KiB)")
	flag.Parse()
	if a.relayURL == "" || a.local == "" || a.backoffBase <= 0 || a.backoffCap < a.backoffBase {
		flag.Usage()
		os.Exit(2)
	}
	a.transport = &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
		DisableCompression:  true,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     30 * time.Second,
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a.run(ctx)
	logger.Printf("stopped")
}

// backoff is base * 2^(attempt-1), clamped to [base, cap] (seed 001's fixed version).
func (a *agent) backoff(attempt int) time.Duration {
	if attempt <= 1 {
		return a.backoffBase
	}
	d := a.backoffBase
	for i := 1; i < attempt && d < a.backoffCap; i++ {
		d *= 2
	}
	if d > a.backoffCap {
		return a.backoffCap
	}
	return d
}

func (a *agent) run(ctx context.Context) {
	attempt := 0
	for ctx.Err() == nil {
		attempt++
		up, err := a.connect(ctx)
		if ctx.Err() != nil {
			return
		}
		var delay time.Duration
		var why string
		var closeErr *websocket.CloseError
		switch {
		case errors.Is(err, errUnauthorized):
			delay, why = a.backoffCap, "unauthorized"
		case up && errors.As(err, &closeErr) && closeErr.Code == closeReplaced:
			delay, why = a.backoff(attempt), "replaced"
		case up:
			attempt = 0 // the session was up: redial at once
			continue
		default:
			delay, why = a.backoff(attempt), "dial-failed"
		}
		logger.Printf("attempt %d: %v; retrying in %v", attempt, err, delay)
		event("AGENT RETRY %d %s %s", attempt, delay, why)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// connect runs one session. up tells whether the session came up; err is why
// the dial failed or why the session ended.
func (a *agent) connect(ctx context.Context) (up bool, err error) {
	u, err := url.Parse(a.relayURL)
	if err != nil {
		return false, err
	}
	q := u.Query()
	if a.token != "" {
		q.Set("token", a.token)
	}
	u.RawQuery = q.Encode()
	dialer := websocket.Dialer{
		Proxy:            nil,
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   a.wsBuffer,
		WriteBufferSize:  a.wsBuffer,
	}
	logger.Printf("dialing %s", u.Host)
	ws, resp, err := dialer.DialContext(ctx, u.String(), nil)
	if err != nil {
		if resp != nil && (resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden) {
			return false, fmt.Errorf("%w: HTTP %d", errUnauthorized, resp.StatusCode)
		}
		return false, err
	}
	conn := wsconn.New(ws)
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = true
	cfg.KeepAliveInterval = keepAliveInterval
	cfg.ConnectionWriteTimeout = connectionWriteTimeout
	cfg.LogOutput = nil
	cfg.Logger = log.New(os.Stderr, "goagent yamux: ", log.Lmicroseconds)
	session, err := yamux.Client(conn, cfg)
	if err != nil {
		conn.Close()
		return false, err
	}
	event("AGENT ONLINE")

	// sessCtx ends with the session (or on shutdown); stream handlers use it.
	sessCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-sessCtx.Done():
		case <-session.CloseChan():
		}
		cancel()
		session.Close()
	}()

	var wg sync.WaitGroup
	var acceptErr error
	for {
		stream, err := session.AcceptStream()
		if err != nil {
			acceptErr = err
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.handleStream(sessCtx, stream)
		}()
	}
	session.Close()
	reason := acceptErr // yamux's first error: a read error, keepalive timeout ...
	var closeErr *websocket.CloseError
	if err := conn.ReadErr(); errors.As(err, &closeErr) {
		reason = err // the relay's close frame
	}
	if ctx.Err() != nil {
		reason = ctx.Err()
	}
	event("AGENT OFFLINE %v", reason)
	cancel()
	wg.Wait()
	return true, reason
}

func (a *agent) handleStream(ctx context.Context, stream *yamux.Stream) {
	defer stream.Close()
	br := bufio.NewReaderSize(stream, 64<<10)
	req, err := http.ReadRequest(br)
	if err != nil {
		logger.Printf("stream %d: reading the request: %v", stream.StreamID(), err)
		return
	}
	if isWebSocketUpgrade(req) {
		a.pipeWebSocket(ctx, stream, br, req)
		return
	}
	a.forwardHTTP(ctx, stream, br, req)
}

// notifyBody closes done once the request body has been read to its end or closed.
type notifyBody struct {
	io.ReadCloser
	once sync.Once
	done chan struct{}
}

func (b *notifyBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil {
		b.once.Do(func() { close(b.done) })
	}
	return n, err
}

func (b *notifyBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(func() { close(b.done) })
	return err
}

func (a *agent) forwardHTTP(ctx context.Context, stream *yamux.Stream, br *bufio.Reader, req *http.Request) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	finished := make(chan struct{})
	var finishOnce sync.Once
	finish := func() { finishOnce.Do(func() { close(finished) }) }
	defer finish()

	bodyDone := make(chan struct{})
	if req.Body == nil || req.Body == http.NoBody {
		close(bodyDone)
	} else {
		req.Body = &notifyBody{ReadCloser: req.Body, done: bodyDone}
	}
	// After the request the relay sends nothing: EOF (its FIN), RST or the
	// session's end means it gave up, so stop the local request and unblock
	// any write to the stream.
	go func() {
		select {
		case <-bodyDone:
		case <-finished:
			return
		}
		_, _ = io.Copy(io.Discard, br)
		select {
		case <-finished:
		default:
			logger.Printf("stream %d: the relay ended the stream before the response was complete", stream.StreamID())
			cancel()
			stream.Close()
		}
	}()

	method := req.Method
	hop.Strip(req.Header)
	req.Close = false
	req.RequestURI = ""
	req.URL.Scheme = "http"
	req.URL.Host = a.local
	resp, err := a.transport.RoundTrip(req.WithContext(ctx))
	if err != nil {
		if ctx.Err() == nil {
			logger.Printf("stream %d: local request failed: %v", stream.StreamID(), err)
			writeBadGateway(stream, err)
		}
		return
	}
	defer resp.Body.Close()
	err = writeResponse(stream, method, resp)
	finish()
	if err != nil && ctx.Err() == nil {
		logger.Printf("stream %d: writing the response: %v", stream.StreamID(), err)
	}
}

func writeBadGateway(w io.Writer, err error) {
	body := "local server unreachable: " + err.Error() + "\n"
	_, _ = fmt.Fprintf(w, "HTTP/1.1 502 Bad Gateway\r\n"+
		"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
}

// writeResponse writes resp as HTTP/1.1, streaming the body: one flush per
// read, Content-Length kept when known, chunked otherwise. Trailers are dropped.
func writeResponse(w io.Writer, method string, resp *http.Response) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	status := resp.Status
	if status == "" {
		status = strconv.Itoa(resp.StatusCode) + " " + http.StatusText(resp.StatusCode)
	}
	if _, err := fmt.Fprintf(bw, "HTTP/1.1 %s\r\n", status); err != nil {
		return err
	}
	h := resp.Header.Clone()
	hop.Strip(h)
	h.Del("Content-Length")
	code := resp.StatusCode
	noBody := method == http.MethodHead || code/100 == 1 || code == http.StatusNoContent || code == http.StatusNotModified
	chunked := false
	switch {
	case noBody:
		if cl := resp.Header.Get("Content-Length"); cl != "" {
			h.Set("Content-Length", cl) // a HEAD response keeps the advertised length
		}
	case resp.ContentLength >= 0:
		h.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	default:
		h.Set("Transfer-Encoding", "chunked")
		chunked = true
	}
	if err := h.Write(bw); err != nil {
		return err
	}
	if _, err := bw.WriteString("\r\n"); err != nil {
		return err
	}
	if noBody {
		return bw.Flush()
	}
	buf := make([]byte, 32<<10)
	var written int64
	// A Content-Length body ends without waiting for EOF, so the relay's FIN after
	// the last byte is not taken for giving up.
	for chunked || written < resp.ContentLength {
		n, err := resp.Body.Read(buf)
		written += int64(n)
		if n > 0 {
			if chunked {
				fmt.Fprintf(bw, "%x\r\n", n)
			}
			bw.Write(buf[:n])
			if chunked {
				bw.WriteString("\r\n")
			}
			if ferr := bw.Flush(); ferr != nil {
				return ferr
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return err // the missing end of the body tells the relay
		}
	}
	if chunked {
		bw.WriteString("0\r\n\r\n")
	}
	return bw.Flush()
}

// pipeWebSocket writes the upgrade request raw to a new connection to the
// local server and pipes bytes both ways until both directions are done.
func (a *agent) pipeWebSocket(ctx context.Context, stream *yamux.Stream, br *bufio.Reader, req *http.Request) {
	local, err := (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, "tcp", a.local)
	if err != nil {
		logger.Printf("stream %d: websocket: dialing the local server: %v", stream.StreamID(), err)
		writeBadGateway(stream, err)
		return
	}
	defer local.Close()
	head := bufio.NewWriter(local)
	fmt.Fprintf(head, "%s %s HTTP/1.1\r\nHost: %s\r\n", req.Method, req.RequestURI, req.Host)
	req.Header.Write(head)
	head.WriteString("\r\n")
	if err := head.Flush(); err != nil {
		logger.Printf("stream %d: websocket: writing the request: %v", stream.StreamID(), err)
		return
	}
	done := make(chan struct{}, 2)
	go func() { // relay -> local; br may hold bytes that followed the request
		_, _ = io.Copy(local, br)
		if tcp, ok := local.(*net.TCPConn); ok {
			tcp.CloseWrite()
		}
		done <- struct{}{}
	}()
	go func() { // local -> relay
		_, _ = io.Copy(stream, local)
		stream.Close()
		done <- struct{}{}
	}()
	for i := 0; i < 2; i++ {
		select {
		case <-done:
		case <-ctx.Done(): // the session is gone
			local.Close()
			stream.Close()
			return
		}
	}
}

func isWebSocketUpgrade(r *http.Request) bool {
	for _, v := range r.Header.Values("Upgrade") {
		if strings.EqualFold(strings.TrimSpace(v), "websocket") {
			return true
		}
	}
	return false
}

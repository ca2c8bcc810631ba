// The dashboard's only script. Pages work without it; with it, a running deployment's log
// and a rollout's progress follow the API's server-sent events. It only ever sets text
// (textContent), never markup, so nothing the server streams can become HTML.
"use strict";

(function () {
  function followLog(log) {
    var url = log.getAttribute("data-follow");
    if (!url || typeof EventSource === "undefined") {
      return;
    }
    var status = document.getElementById("deployment-status");
    var source = new EventSource(url);
    source.addEventListener("line", function (event) {
      var entry;
      try {
        entry = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      // A reconnect resumes after the last id the browser saw; never show a line twice.
      if (log.querySelector('[data-id="' + Number(entry.id) + '"]')) {
        return;
      }
      var span = document.createElement("span");
      span.className = "line " + (entry.stream === "stderr" ? "stderr" : entry.stream === "stdout" ? "stdout" : "sensei");
      span.setAttribute("data-id", String(Number(entry.id)));
      span.textContent = entry.line + "\n";
      log.appendChild(span);
      log.scrollTop = log.scrollHeight;
    });
    source.addEventListener("status", function (event) {
      source.close();
      var word = "";
      try {
        word = JSON.parse(event.data).status;
      } catch (e) {
        return;
      }
      setStatus(status, word);
      refreshFacts(function () {
        log.removeAttribute("data-follow");
        log.setAttribute("data-ended", word);
      });
    });
  }

  function showTime(iso) {
    return iso ? iso.replace("T", " ").slice(0, 19) + " UTC" : "—";
  }

  // Re-reads the deployment from the API once it has ended, for what is known only then.
  function refreshFacts(done) {
    var facts = document.getElementById("deployment");
    var url = facts && facts.getAttribute("data-view");
    if (!url || typeof fetch === "undefined") {
      done();
      return;
    }
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (view) {
        if (view) {
          facts.querySelectorAll("[data-field]").forEach(function (field) {
            var name = field.getAttribute("data-field");
            var value = view[name];
            if (name === "error") {
              field.textContent = value ? value.step + ": " + value.message : "—";
            } else if (name === "duration_secs") {
              field.textContent = typeof value === "number" ? value.toFixed(1) + " s" : "—";
            } else if (name.slice(-3) === "_at") {
              field.textContent = showTime(value);
            } else {
              field.textContent = value || "—";
            }
          });
        }
      })
      .catch(function () {})
      .then(done);
  }

  function setStatus(holder, word) {
    if (!holder) {
      return;
    }
    var span = document.createElement("span");
    var tone = { succeeded: " ok", connected: " ok", failed: " bad", halted: " bad", aborted: " bad", rolled_back: " bad", offline: " bad", running: " busy", queued: " busy", waiting_approval: " busy", paused: " busy" }[word] || "";
    span.className = "status" + tone;
    span.setAttribute("data-status", word);
    span.textContent = word;
    holder.replaceChildren(span);
  }

  function stateKey(view) {
    if (view.state !== "paused") {
      return view.state;
    }
    return view.paused_reason && view.paused_reason.indexOf("approval") >= 0 ? "paused:approval" : "paused:operator";
  }

  function followRollout(box) {
    var url = box.getAttribute("data-follow");
    if (!url || typeof EventSource === "undefined") {
      return;
    }
    var source = new EventSource(url);
    source.addEventListener("rollout", function (event) {
      var view;
      try {
        view = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      setStatus(document.getElementById("rollout-state"), view.state);
      var reason = document.getElementById("rollout-reason");
      if (reason) {
        reason.textContent = view.paused_reason || view.halted_reason || "—";
      }
      var batch = document.getElementById("rollout-batch");
      if (batch) {
        batch.textContent = (view.current_batch === null ? 0 : view.current_batch + 1) + " of " + view.batch_count;
      }
      var counts = document.getElementById("target-counts");
      if (counts && view.target_counts) {
        var items = Object.keys(view.target_counts).map(function (name) {
          var li = document.createElement("li");
          li.setAttribute("data-count", name);
          li.textContent = name + ": " + view.target_counts[name];
          return li;
        });
        counts.replaceChildren.apply(counts, items);
      }
      (view.targets || []).forEach(function (target) {
        var row = document.querySelector('tr[data-target="' + String(target.server_id).replace(/[^0-9a-f-]/g, "") + '"]');
        if (!row) {
          return;
        }
        setStatus(row.querySelector('[data-field="status"]'), target.status);
        var error = row.querySelector('[data-field="error"]');
        if (error) {
          error.textContent = target.error || "";
        }
      });
      var key = stateKey(view);
      box.querySelectorAll("form[data-when]").forEach(function (form) {
        form.hidden = form.getAttribute("data-when").split(" ").indexOf(key) < 0;
      });
      box.setAttribute("data-state", key);
      if (["succeeded", "aborted", "rolled_back"].indexOf(view.state) >= 0 || (view.state === "halted" && view.finished_at)) {
        source.close();
      }
    });
  }

  // A token emailed as a link travels in the URL's fragment, which no server sees: copy it
  // into its field, then drop it from the address bar and the history.
  function tokenFromFragment() {
    var field = document.querySelector('input[data-from-fragment="token"]');
    var match = /^#token=([A-Za-z0-9_.~-]+)$/.exec(window.location.hash);
    if (field && match) {
      field.value = match[1];
      window.history.replaceState(null, "", window.location.pathname);
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    tokenFromFragment();
    var log = document.getElementById("log");
    if (log) {
      followLog(log);
    }
    var rollout = document.getElementById("rollout");
    if (rollout) {
      followRollout(rollout);
    }
    document.documentElement.setAttribute("data-script", "ready");
  });
})();
